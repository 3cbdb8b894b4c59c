//! The instance side of a Port session: the data channel as the SSM agent runs
//! it ([`channel`]) and the port plugin that dials targets.

pub mod channel;
