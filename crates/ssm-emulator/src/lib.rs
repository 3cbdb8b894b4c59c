//! A local stand-in for AWS Systems Manager Session Manager: the SSM JSON API,
//! the ssmmessages websocket endpoint, and the instance agent's behaviour for
//! Port sessions. Built to be faithful to upstream, not to our client.

pub mod agent;
