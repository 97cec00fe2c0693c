//! Gateways: which Istio Gateways this node serves, on which ports, with which
//! bound VirtualService routes; each port served by the kernel alone (one
//! weighted decision per connection) or by the HTTP router (per request).

pub mod table;
