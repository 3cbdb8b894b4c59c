//! The handshake (ssm-protocol.md §4.2-4.3): the agent's HandshakeRequest is
//! answered with our HandshakeResponse as the first client stream message,
//! and HandshakeComplete opens the data phase. A KMSEncryption action waits
//! for the data key (see [`super::kms`]); the encryption challenge follows
//! the response.

use std::collections::BTreeMap;

use base64::Engine;

use super::kms::{Cipher, DataKey, DataKeyRequest, End};
use super::{CloseReason, Event, HandshakeInfo, Session, State};
use crate::codec::PayloadType;
use crate::payloads::{
    action_type, ActionStatus, EncryptionChallenge, HandshakeComplete, HandshakeRequest, HandshakeResponse,
    KmsEncryptionRequest, KmsEncryptionResponse, ProcessedClientAction, SessionTypeRequest,
};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

impl Session {
    pub(super) fn on_handshake_request(&mut self, payload: &[u8]) {
        if self.state != State::AwaitHandshakeRequest || self.pending_handshake.is_some() {
            return; // A resent request after we answered (or while KMS works): the ack above suffices.
        }
        let req: HandshakeRequest = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => return self.close(CloseReason::HandshakeFailed(format!("malformed HandshakeRequest: {e}"))),
        };
        let kms = req.requested_client_actions.iter().find(|a| a.action_type == action_type::KMS_ENCRYPTION);
        if let Some(action) = kms {
            match serde_json::from_value::<KmsEncryptionRequest>(action.action_parameters.clone()) {
                Ok(p) if !p.kms_key_id.is_empty() => {
                    let challenge = Some(p.challenge).filter(|c| !c.is_empty());
                    self.data_key_request = Some(DataKeyRequest { key_id: p.kms_key_id, challenge });
                    self.pending_handshake = Some(req);
                    return;
                }
                _ => return self.answer(req, Some(Err("malformed KMSEncryption parameters".into()))),
            }
        }
        self.answer(req, None);
    }

    /// The data key for the KMSEncryption action (or why there is none): the
    /// handshake's answer goes out now.
    pub fn provide_data_key(&mut self, key: Result<DataKey, String>) {
        if let Some(req) = self.pending_handshake.take() {
            self.answer(req, Some(key));
        }
    }

    /// Our HandshakeResponse to `req`; `key` is the KMS data key, if asked for.
    fn answer(&mut self, req: HandshakeRequest, mut key: Option<Result<DataKey, String>>) {
        let mut info = HandshakeInfo {
            agent_version: req.agent_version.clone(),
            session_type: String::new(),
            properties: BTreeMap::new(),
        };
        let mut failure = None;
        let mut actions = Vec::new();
        for action in &req.requested_client_actions {
            let mut result = None;
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
                action_type::KMS_ENCRYPTION => match key.take() {
                    Some(Ok(k)) => match Cipher::new(&k.plaintext, End::Client) {
                        Some(cipher) => {
                            let challenge = action
                                .action_parameters
                                .get("Challenge")
                                .and_then(|c| c.as_str())
                                .is_some_and(|c| !c.is_empty());
                            let response = KmsEncryptionResponse {
                                kms_cipher_text_key: B64.encode(&k.ciphertext),
                                kms_cipher_text_hash: None,
                                challenge_acknowledgement: challenge,
                            };
                            result = serde_json::to_value(response).ok();
                            self.cipher = Some(cipher);
                            (ActionStatus::SUCCESS, String::new())
                        }
                        None => (
                            ActionStatus::FAILED,
                            format!("KMS returned a {}-byte data key, not 64", k.plaintext.len()),
                        ),
                    },
                    Some(Err(e)) => (ActionStatus::FAILED, format!("Failed to process action KMSEncryption: {e}")),
                    None => (ActionStatus::FAILED, "KMSEncryption was asked twice".to_owned()),
                },
                other => (ActionStatus::UNSUPPORTED, format!("unknown action {other}")),
            };
            if status != ActionStatus::SUCCESS && failure.is_none() {
                failure = Some(error.clone());
            }
            actions.push(ProcessedClientAction {
                action_type: action.action_type.clone(),
                action_status: status,
                action_result: result,
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

    /// The agent's challenge, under its key: answered with the same bytes
    /// under ours. It proves both ends hold the data key.
    pub(super) fn on_encryption_challenge(&mut self, payload: &[u8]) {
        let plain = serde_json::from_slice::<EncryptionChallenge>(payload)
            .ok()
            .and_then(|c| B64.decode(c.challenge).ok())
            .and_then(|sealed| self.cipher.as_ref()?.open(&sealed));
        let Some(plain) = plain else {
            return self.close(CloseReason::HandshakeFailed(
                "the agent's encryption challenge could not be decrypted with the KMS data key".into(),
            ));
        };
        let nonce = self.nonce();
        let sealed = self.cipher.as_ref().map(|c| c.seal(nonce, &plain)).unwrap_or_default();
        let answer = EncryptionChallenge { challenge: B64.encode(sealed) };
        let payload = serde_json::to_vec(&answer).unwrap_or_default();
        self.enqueue_stream(PayloadType::ENC_CHALLENGE_RESPONSE, &payload);
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
