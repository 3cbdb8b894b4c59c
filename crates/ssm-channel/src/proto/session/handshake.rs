//! The handshake (ssm-protocol.md §4.2-4.3): the agent's HandshakeRequest is
//! answered with our HandshakeResponse as the first client stream message,
//! and HandshakeComplete opens the data phase.

use std::collections::BTreeMap;

use super::{CloseReason, Event, HandshakeInfo, Session, State};
use crate::codec::PayloadType;
use crate::payloads::{
    action_type, ActionStatus, HandshakeComplete, HandshakeRequest, HandshakeResponse, ProcessedClientAction,
    SessionTypeRequest,
};

impl Session {
    pub(super) fn on_handshake_request(&mut self, payload: &[u8]) {
        if self.state != State::AwaitHandshakeRequest {
            return; // A resent request after we answered: the ack above suffices.
        }
        let req: HandshakeRequest = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => return self.close(CloseReason::HandshakeFailed(format!("malformed HandshakeRequest: {e}"))),
        };
        let mut info = HandshakeInfo {
            agent_version: req.agent_version.clone(),
            session_type: String::new(),
            properties: BTreeMap::new(),
        };
        let mut failure = None;
        let mut actions = Vec::new();
        for action in &req.requested_client_actions {
            let (status, error) = match action.action_type.as_str() {
                action_type::SESSION_TYPE => {
                    match serde_json::from_value::<SessionTypeRequest>(action.action_parameters.clone()) {
                        Ok(p) if self.config.session_types.contains(&p.session_type.as_str()) => {
                            info.session_type = p.session_type;
                            info.properties = p
                                .properties
                                .into_iter()
                                .map(|(k, v)| (k, v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())))
                                .collect();
                            (ActionStatus::SUCCESS, String::new())
                        }
                        Ok(p) => (
                            ActionStatus::FAILED,
                            format!(
                                "session type {:?} is not one this client asked for ({})",
                                p.session_type,
                                self.config.session_types.join(", ")
                            ),
                        ),
                        Err(e) => (ActionStatus::FAILED, format!("malformed SessionType parameters: {e}")),
                    }
                }
                action_type::KMS_ENCRYPTION => {
                    (ActionStatus::FAILED, "KMS encryption is not supported by this client".to_owned())
                }
                other => (ActionStatus::UNSUPPORTED, format!("unknown action {other}")),
            };
            if status != ActionStatus::SUCCESS && failure.is_none() {
                failure = Some(error.clone());
            }
            actions.push(ProcessedClientAction {
                action_type: action.action_type.clone(),
                action_status: status,
                action_result: None,
                error,
            });
        }
        let resp = HandshakeResponse {
            client_version: self.config.client_version.clone(),
            processed_client_actions: actions,
            errors: None,
        };
        let payload = serde_json::to_vec(&resp).unwrap_or_default();
        // The response is the first client stream message: seq 0, outside the window.
        self.enqueue_stream(PayloadType::HANDSHAKE_RESPONSE, &payload);
        match failure {
            Some(e) => self.close(CloseReason::HandshakeFailed(e)),
            None => {
                self.state = State::AwaitHandshakeComplete;
                self.events.push_back(Event::Handshake(info));
            }
        }
    }

    pub(super) fn on_handshake_complete(&mut self, payload: &[u8]) {
        if self.state != State::AwaitHandshakeComplete {
            return;
        }
        let done: HandshakeComplete = match serde_json::from_slice(payload) {
            Ok(d) => d,
            Err(e) => return self.close(CloseReason::HandshakeFailed(format!("malformed HandshakeComplete: {e}"))),
        };
        self.state = State::Established;
        self.events.push_back(Event::Established { customer_message: done.customer_message });
    }
}
