//! The parts of the running tunnel that `start` puts together.
//!
//! - [`link`]: the laptop end of the packet link, between the tunnel device and
//!   the ec2-agent (HELLO, FQ-CoDel uplink queue, split DNS, pings).
//! - [`uplink`]: finds an instance, keeps a Port session to it alive, and
//!   reconnects, rotates and fails over.
//! - [`netwatch`]: news of network changes and wake-ups.
//! - [`dns`]: the split-DNS resolver entries the OS sees, and their cleanup.
//! - [`control`]: the control socket `status` and `stop` talk to.
//! - [`platform`]: the machine (routes, interfaces, device, DNS backend)
//!   behind one trait, faked in the start and teardown tests.

pub mod control;
pub mod dns;
pub mod link;
pub mod netwatch;
pub mod platform;
pub mod uplink;
