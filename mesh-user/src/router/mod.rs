//! The HTTP router of gateway ports whose bound routes need a per-request
//! decision (uri, headers, method, authority): serves compile's
//! [`HttpTable`](crate::compile::gateway::table::HttpTable)s.
