//! `--no-redirect` leaves the sockops program out, and with it what it counts
//! or clears: outlier detection and LEAST_REQUEST (connections counted),
//! `maxConnections` (open connections counted), `connectTimeout` (cleared at
//! ESTABLISHED). Such a table is written without them, and each is said once
//! per Service and field: never applied as something else.

use super::Compiled;
use crate::model::{Diagnostic, Kind, NamespacedName, ObjectRef};

/// Leaves out of `out` (one Service's tables) what needs sockops.
pub(super) fn leave_out(out: &mut Compiled) {
    let mut said = Vec::new();
    let mut say = |service: &NamespacedName, field: &str, why: &str, then: &str| {
        let me = ObjectRef::new(Kind::Service, service.clone());
        said.push(Diagnostic::warning(
            &me,
            format!("{field} (its DestinationRule)"),
            format!(
                "not honoured: {why} by the sockops program, which --no-redirect leaves out{then}"
            ),
        ));
    };
    for pool in std::mem::take(&mut out.outlier).keys() {
        say(
            &pool.service,
            "outlierDetection",
            "connects are counted",
            "",
        );
    }
    for plan in out.services.values_mut() {
        if plan.least_request {
            plan.least_request = false;
            say(
                &plan.service,
                "loadBalancer.simple LEAST_REQUEST",
                "open connections are counted",
                "; balanced at random",
            );
        }
        let Some(options) = &mut plan.socket else {
            continue;
        };
        if options.max_connections > 0 {
            options.max_connections = 0;
            say(
                &plan.service,
                "connectionPool.tcp.maxConnections",
                "open connections are counted",
                "",
            );
        }
        if options.connect_timeout_ms > 0 {
            options.connect_timeout_ms = 0;
            say(
                &plan.service,
                "connectionPool.tcp.connectTimeout",
                "the option is cleared at ESTABLISHED",
                "",
            );
        }
        if *options == mesh_common::SocketPolicy::default() {
            plan.socket = None;
        }
    }
    out.diagnostics.extend(said);
}
