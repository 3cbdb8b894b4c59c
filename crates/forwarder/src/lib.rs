//! The packet link between the laptop's tunnel device and the ec2-agent.
//!
//! - [`wire`]: the framing both ends speak inside the Port session (HELLO, PACKET,
//!   PING/PONG, GOODBYE) and an incremental deframer.
//! - [`ip`]: building the IP packets an end answers with itself.
//! - [`fq`]: FQ-CoDel, so interactive flows are not stuck behind bulk transfers.
//! - [`window`]: the ack-clocked send window that keeps queues out of the SSM path.
//! - [`link`]: queue-draining writer and frame reader shared by both ends.
//! - [`reorder`], [`stripe`]: a striped link's packets back in order.
//! - [`timer`]: a loop timer that re-arms without waking tokio's driver.
//! - [`dns`]: split DNS on the laptop end (only configured domains go through).
//!
//! The laptop end (between the tunnel device and the stream) is `ssm-proxy`'s
//! `daemon::link`; the agent end is the ec2-agent. Both speak this crate.

pub mod dns;
pub mod fq;
pub mod ip;
pub mod link;
pub mod reorder;
pub mod stripe;
pub mod tcpwatch;
pub mod timer;
pub mod window;
pub mod wire;
