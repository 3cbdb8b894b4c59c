//! A KMS for encrypted sessions: `TrentService.GenerateDataKey` for the
//! client (JSON 1.1, SigV4 for `kms`, as aws-sdk-kms calls it) and Decrypt
//! for the emulated agent, which checks the encryption context as KMS does.
//! Keys are the ones given with `--kms-key`; a data key's ciphertext is an
//! opaque random blob that only this emulator can decrypt.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::api::ApiError;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Debug, Clone)]
struct Issued {
    key_arn: String,
    context: BTreeMap<String, String>,
    plaintext: Vec<u8>,
}

/// The data keys issued so far, by ciphertext.
#[derive(Debug, Default)]
pub struct Kms {
    issued: Mutex<HashMap<Vec<u8>, Issued>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GenerateDataKeyRequest {
    key_id: String,
    number_of_bytes: Option<i64>,
    key_spec: Option<String>,
    #[serde(default)]
    encryption_context: BTreeMap<String, String>,
}

fn err(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError { code, message: message.into() }
}

/// The ARN of `key` as KMS reports it (an ARN stays as it is).
pub fn key_arn(key: &str) -> String {
    if key.starts_with("arn:") {
        key.to_owned()
    } else if let Some(alias) = key.strip_prefix("alias/") {
        format!("arn:aws:kms:us-east-1:000000000000:alias/{alias}")
    } else {
        format!("arn:aws:kms:us-east-1:000000000000:key/{key}")
    }
}

impl Kms {
    /// GenerateDataKey against the keys in `keys`.
    pub fn generate_data_key(&self, keys: &[String], body: &[u8]) -> Result<Value, ApiError> {
        let req: GenerateDataKeyRequest =
            serde_json::from_slice(body).map_err(|e| err("SerializationException", e.to_string()))?;
        let Some(key) = keys.iter().find(|k| **k == req.key_id || key_arn(k) == req.key_id) else {
            return Err(err("NotFoundException", format!("Key '{}' does not exist", key_arn(&req.key_id))));
        };
        let bytes = match (req.number_of_bytes, req.key_spec.as_deref()) {
            (Some(n), None) if (1..=1024).contains(&n) => n as usize,
            (None, Some("AES_256")) => 32,
            (None, Some("AES_128")) => 16,
            _ => {
                return Err(err(
                    "ValidationException",
                    "give NumberOfBytes (1-1024) or KeySpec (AES_256, AES_128), not both",
                ))
            }
        };
        let plaintext: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
        let ciphertext: Vec<u8> =
            b"emulator-kms\x01".iter().copied().chain((0..48).map(|_| rand::random::<u8>())).collect();
        let key_arn = key_arn(key);
        let issued = Issued { key_arn: key_arn.clone(), context: req.encryption_context, plaintext: plaintext.clone() };
        self.issued.lock().unwrap_or_else(|e| e.into_inner()).insert(ciphertext.clone(), issued);
        Ok(json!({"CiphertextBlob": B64.encode(ciphertext), "Plaintext": B64.encode(plaintext), "KeyId": key_arn}))
    }

    /// Decrypt, as the agent calls it: the blob, the same encryption context
    /// and the key it was made under, or InvalidCiphertextException.
    pub fn decrypt(&self, ciphertext: &[u8], key: &str, context: &BTreeMap<String, String>) -> Result<Vec<u8>, String> {
        let issued = self.issued.lock().unwrap_or_else(|e| e.into_inner()).get(ciphertext).cloned();
        match issued {
            Some(i) if i.context == *context && i.key_arn == key_arn(key) => Ok(i.plaintext),
            Some(_) | None => {
                Err("InvalidCiphertextException: the ciphertext, key or encryption context is wrong".into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_key_decrypts_only_with_its_key_and_exact_context() {
        let kms = Kms::default();
        let keys = vec!["alias/ssm-sessions".to_owned()];
        let body = br#"{"KeyId":"alias/ssm-sessions","NumberOfBytes":64,"EncryptionContext":{"aws:ssm:SessionId":"s","aws:ssm:TargetId":"i"}}"#;
        let out = kms.generate_data_key(&keys, body).expect("generated");
        let blob = B64.decode(out["CiphertextBlob"].as_str().expect("blob")).expect("b64");
        let plain = B64.decode(out["Plaintext"].as_str().expect("plain")).expect("b64");
        assert_eq!(plain.len(), 64);
        let ctx: BTreeMap<String, String> =
            [("aws:ssm:SessionId".into(), "s".into()), ("aws:ssm:TargetId".into(), "i".into())].into();
        assert_eq!(kms.decrypt(&blob, "alias/ssm-sessions", &ctx), Ok(plain));
        let mut other = ctx.clone();
        other.insert("aws:ssm:RandomChallenge".into(), "x".into());
        assert!(kms.decrypt(&blob, "alias/ssm-sessions", &other).is_err(), "the context must match exactly");
        assert!(kms.decrypt(&blob, "alias/other", &ctx).is_err());
        assert!(kms.decrypt(b"forged", "alias/ssm-sessions", &ctx).is_err());
        let unknown = br#"{"KeyId":"alias/nope","NumberOfBytes":64}"#;
        assert_eq!(kms.generate_data_key(&keys, unknown).expect_err("unknown key").code, "NotFoundException");
        let both = br#"{"KeyId":"alias/ssm-sessions","NumberOfBytes":64,"KeySpec":"AES_256"}"#;
        assert_eq!(kms.generate_data_key(&keys, both).expect_err("both").code, "ValidationException");
    }
}
