//! The BitBake front end: event logs and the live XMLRPC interface.

pub mod pickle;
