//! What changed in the index since compile last looked, so that compile
//! redoes only the Services a change touches (issue 15: work proportional to
//! the change). The rules, from the cheapest to the widest:
//!
//! - an EndpointSlice: the Service it names (before and after the change);
//! - a Service's new version: that Service (compile adds the Services whose
//!   routes read it);
//! - a Pod whose name, labels and node stay: the Services without slices whose
//!   selector matches it (Services with slices read readiness from them);
//! - a Pod created, deleted, relabelled or moved: the Services whose selector
//!   matches it before or after, since the EndpointSlice controller's slices
//!   name only pods their Service selects; when a slice no controller manages
//!   names pods, every Service;
//! - anything else (a Service created or deleted, which changes what hosts
//!   resolve to; a VirtualService, DestinationRule, Gateway, Node, the mesh's
//!   namespaces): every Service.

use std::collections::BTreeSet;

use crate::model::NamespacedName;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Something changed that may touch any Service: compile all of them.
    pub all: bool,
    /// Services whose own object, slices or pods changed.
    pub services: BTreeSet<NamespacedName>,
    /// Some Pod changed: the meshed pods and the redirect exclusions read them.
    pub pods: bool,
}

impl Changes {
    /// Everything: what the first compile does.
    pub fn everything() -> Self {
        Self {
            all: true,
            services: BTreeSet::new(),
            pods: true,
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.all && !self.pods && self.services.is_empty()
    }

    /// Adds what `other` says changed.
    pub fn merge(&mut self, other: Changes) {
        self.all |= other.all;
        self.pods |= other.pods;
        self.services.extend(other.services);
    }
}
