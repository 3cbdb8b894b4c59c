//! The ec2-agent's parts, for its binary (`main.rs`: options, the listener)
//! and for the fuzz target that feeds a client's bytes through the same path
//! (`fuzz/fuzz_targets/agent_input.rs`).
//!
//! Without I/O: [`packet`] (parsing and the replies the agent builds),
//! [`flows`] (one client's flow table), [`policy`] (where traffic may go),
//! [`stack`] (the userspace TCP stack, fed and polled). With I/O: [`session`]
//! (one client's connections and sockets), [`admit`] (who may take a slot),
//! [`imds`] (the instance's VPC).

pub mod admit;
pub mod flows;
pub mod imds;
pub mod packet;
pub mod policy;
pub mod session;
pub mod stack;
pub mod udp;
