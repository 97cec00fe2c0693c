//! The HTTP router of gateway ports whose bound routes need a per-request
//! decision (uri, headers, method, authority): serves compile's
//! [`HttpTable`](crate::compile::gateway::table::HttpTable)s.
//! (Placeholder until the router lands: listens nowhere.)

use std::{collections::BTreeMap, net::SocketAddr};

use crate::compile::gateway::table::HttpTable;

#[derive(Debug, Default)]
pub struct Router {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listening {
    pub v4: SocketAddr,
    pub v6: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum RouterError {}

impl Router {
    pub fn new() -> Self {
        Self {}
    }

    pub fn update(
        &mut self,
        _tables: Vec<HttpTable>,
    ) -> Result<BTreeMap<u16, Listening>, RouterError> {
        Ok(BTreeMap::new())
    }
}
