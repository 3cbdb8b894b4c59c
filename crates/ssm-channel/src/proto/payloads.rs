//! JSON payloads carried inside frames, with the exact upstream field names
//! (`src/message/clientmessage.go` in the plugin, `agent/session/contracts/` in the agent).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// First websocket frame (text): opens the data channel with the session token.
/// `src/service/service.go` (OpenDataChannelInput).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct OpenDataChannel {
    pub message_schema_version: String,
    pub request_id: String,
    pub token_value: String,
    pub client_id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub client_version: String,
}

/// `acknowledge` payload. Receivers match on the sequence number only.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Acknowledge {
    #[serde(rename = "AcknowledgedMessageType")]
    pub message_type: String,
    #[serde(rename = "AcknowledgedMessageId")]
    pub message_id: String,
    #[serde(rename = "AcknowledgedMessageSequenceNumber")]
    pub sequence_number: i64,
    #[serde(rename = "IsSequentialMessage")]
    pub is_sequential: bool,
}

impl Acknowledge {
    /// The ack upstream sends for a stream message: `message_type` and
    /// `message_id` are the acknowledged message's.
    pub fn of(message_type: &str, sequence_number: crate::codec::SequenceNumber, message_id: uuid::Uuid) -> Self {
        Acknowledge {
            message_type: message_type.to_owned(),
            message_id: message_id.to_string(),
            sequence_number: sequence_number.0,
            is_sequential: true,
        }
    }

    /// The whole `acknowledge` frame: header seq 0, flags 3, PayloadType 0,
    /// its own `frame_id` and CreatedDate.
    pub fn to_frame(&self, created_date: u64, frame_id: uuid::Uuid) -> Vec<u8> {
        use crate::codec::{message_type, Flags, Message, PayloadType, SequenceNumber};
        let frame = Message {
            message_type: message_type::ACKNOWLEDGE.into(),
            schema_version: 1,
            created_date,
            sequence_number: SequenceNumber(0),
            flags: Flags::ACK,
            message_id: frame_id,
            payload_type: Some(PayloadType::NONE),
            // Serializing plain strings and integers cannot fail; the JSON is
            // never empty, so encoding cannot fail either.
            payload: serde_json::to_vec(self).unwrap_or_default(),
        };
        frame.to_bytes().unwrap_or_default()
    }
}

/// Agent -> client, PayloadType 5.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct HandshakeRequest {
    pub agent_version: String,
    pub requested_client_actions: Vec<RequestedClientAction>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct RequestedClientAction {
    pub action_type: String,
    #[serde(default)]
    pub action_parameters: serde_json::Value,
}

pub mod action_type {
    pub const SESSION_TYPE: &str = "SessionType";
    pub const KMS_ENCRYPTION: &str = "KMSEncryption";
}

/// `ActionParameters` of the SessionType action.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(rename_all = "PascalCase")]
pub struct SessionTypeRequest {
    pub session_type: String,
    /// The session document's properties with parameters filled in; all values are strings.
    #[serde(default)]
    pub properties: BTreeMap<String, serde_json::Value>,
}

/// `ActionParameters` of the KMSEncryption action.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct KmsEncryptionRequest {
    #[serde(rename = "KMSKeyId")]
    pub kms_key_id: String,
    /// Random, base64; newer agents put it in the data key's encryption context.
    #[serde(rename = "Challenge", default, skip_serializing_if = "String::is_empty")]
    pub challenge: String,
}

/// `ActionResult` of a successful KMSEncryption action. Go encodes `[]byte`
/// as standard base64.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct KmsEncryptionResponse {
    #[serde(rename = "KMSCipherTextKey")]
    pub kms_cipher_text_key: String,
    #[serde(rename = "KMSCipherTextHash", default)]
    pub kms_cipher_text_hash: Option<String>,
    /// The challenge is in the encryption context.
    #[serde(rename = "ChallengeAcknowledgement", default)]
    pub challenge_acknowledgement: bool,
}

/// PayloadType 8 (agent -> client) and 9 (client -> agent): base64 bytes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct EncryptionChallenge {
    #[serde(rename = "Challenge")]
    pub challenge: String,
}

/// Client -> agent, PayloadType 6.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct HandshakeResponse {
    pub client_version: String,
    pub processed_client_actions: Vec<ProcessedClientAction>,
    pub errors: Option<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ProcessedClientAction {
    pub action_type: String,
    pub action_status: ActionStatus,
    pub action_result: Option<serde_json::Value>,
    #[serde(default)]
    pub error: String,
}

/// 1 Success, 2 Failed, 3 Unsupported.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ActionStatus(pub i32);

impl ActionStatus {
    pub const SUCCESS: ActionStatus = ActionStatus(1);
    pub const FAILED: ActionStatus = ActionStatus(2);
    pub const UNSUPPORTED: ActionStatus = ActionStatus(3);
}

/// Agent -> client, PayloadType 7.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct HandshakeComplete {
    /// Nanoseconds.
    pub handshake_time_to_complete: i64,
    #[serde(default)]
    pub customer_message: String,
}

/// `channel_closed` payload (MGS -> client).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "PascalCase")]
pub struct ChannelClosed {
    #[serde(default)]
    pub message_id: String,
    #[serde(default)]
    pub created_date: String,
    #[serde(default)]
    pub destination_id: String,
    #[serde(default)]
    pub session_id: String,
    #[serde(default)]
    pub message_type: String,
    #[serde(default)]
    pub schema_version: i64,
    #[serde(default)]
    pub output: String,
}

/// Flag payloads (PayloadType 10): a 4-byte big-endian value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flag {
    /// Basic mode, client -> agent: close the target connection.
    DisconnectToPort,
    /// Client -> agent: end the session.
    TerminateSession,
    /// Mux mode, agent -> client: dialling the target failed for the newest stream.
    ConnectToPortError,
    Unknown(u32),
}

impl Flag {
    pub fn to_bytes(self) -> [u8; 4] {
        let v = match self {
            Flag::DisconnectToPort => 1,
            Flag::TerminateSession => 2,
            Flag::ConnectToPortError => 3,
            Flag::Unknown(v) => v,
        };
        u32::to_be_bytes(v)
    }

    /// Reads the first four bytes big-endian; `None` when fewer are present.
    pub fn parse(payload: &[u8]) -> Option<Flag> {
        let b: [u8; 4] = payload.get(..4)?.try_into().ok()?;
        Some(match u32::from_be_bytes(b) {
            1 => Flag::DisconnectToPort,
            2 => Flag::TerminateSession,
            3 => Flag::ConnectToPortError,
            v => Flag::Unknown(v),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_response_matches_plugin_json() {
        let r = HandshakeResponse {
            client_version: "1.2.677.0".into(),
            processed_client_actions: vec![ProcessedClientAction {
                action_type: "SessionType".into(),
                action_status: ActionStatus::SUCCESS,
                action_result: None,
                error: String::new(),
            }],
            errors: None,
        };
        assert_eq!(
            serde_json::to_string(&r).expect("serializes"),
            r#"{"ClientVersion":"1.2.677.0","ProcessedClientActions":[{"ActionType":"SessionType","ActionStatus":1,"ActionResult":null,"Error":""}],"Errors":null}"#
        );
    }

    #[test]
    fn ack_matches_upstream_json() {
        let a = Acknowledge {
            message_type: "output_stream_data".into(),
            message_id: "dd01e56b-ff48-483e-a508-b5f073f31b16".into(),
            sequence_number: 0,
            is_sequential: true,
        };
        assert_eq!(
            serde_json::to_string(&a).expect("serializes"),
            r#"{"AcknowledgedMessageType":"output_stream_data","AcknowledgedMessageId":"dd01e56b-ff48-483e-a508-b5f073f31b16","AcknowledgedMessageSequenceNumber":0,"IsSequentialMessage":true}"#
        );
    }

    #[test]
    fn parses_agent_handshake_request() {
        let j = r#"{"AgentVersion":"3.3.987.0","RequestedClientActions":[{"ActionType":"SessionType","ActionParameters":{"SessionType":"Port","Properties":{"localPortNumber":"0","portNumber":"80","type":"LocalPortForwarding"}}}]}"#;
        let r: HandshakeRequest = serde_json::from_str(j).expect("parses");
        assert_eq!(r.agent_version, "3.3.987.0");
        let p: SessionTypeRequest =
            serde_json::from_value(r.requested_client_actions[0].action_parameters.clone()).expect("parses");
        assert_eq!(p.session_type, "Port");
        assert_eq!(p.properties["portNumber"], "80");
    }

    #[test]
    fn flags_are_big_endian() {
        assert_eq!(Flag::TerminateSession.to_bytes(), [0, 0, 0, 2]);
        assert_eq!(Flag::parse(&[0, 0, 0, 3]), Some(Flag::ConnectToPortError));
        assert_eq!(Flag::parse(&[0, 0, 1]), None);
        assert_eq!(Flag::parse(&[0, 0, 0, 9]), Some(Flag::Unknown(9)));
    }
}
