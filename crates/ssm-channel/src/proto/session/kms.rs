//! KMS encryption of a session's data, when the agent asks for it in its
//! HandshakeRequest (Session Manager preferences with a KMS key):
//! session-manager-plugin `src/datachannel/streaming.go`
//! (`ProcessKMSEncryptionHandshakeAction`, `handleEncryptionChallengeRequest`),
//! `src/encryption/encrypter.go` and `kmsservice.go`; amazon-ssm-agent
//! `agent/session/crypto/blockcipher.go` and `datachannel.go`.
//!
//! - The client asks KMS for a 64-byte data key (GenerateDataKey, the key the
//!   agent names, encryption context `aws:ssm:SessionId`, `aws:ssm:TargetId`,
//!   and `aws:ssm:RandomChallenge` when the agent sent a challenge) and answers
//!   with the key's ciphertext, which the agent decrypts with the same context.
//! - The first 32 bytes are the agent's sending key (our receiving key), the
//!   last 32 ours.
//! - Each encrypted payload is a 12-byte random nonce, then AES-256-GCM
//!   ciphertext and tag, no associated data. Encrypted are the client's
//!   Output payloads and the agent's Output, StdErr and ExitCode ones.
//! - The agent then sends an encryption challenge (random bytes under its
//!   key); the client answers with them under its own key.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

/// The data key KMS generated: its ciphertext (for the agent) and plaintext.
#[derive(Clone, PartialEq, Eq)]
pub struct DataKey {
    pub ciphertext: Vec<u8>,
    pub plaintext: Vec<u8>,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the plaintext.
        f.debug_struct("DataKey").field("ciphertext_len", &self.ciphertext.len()).finish_non_exhaustive()
    }
}

/// What the agent asked for: the key to generate the data key under, and its
/// random challenge for the encryption context (newer agents).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataKeyRequest {
    pub key_id: String,
    pub challenge: Option<String>,
}

impl DataKeyRequest {
    /// The encryption context KMS must be given for this session.
    pub fn context(&self, session_id: &str, target_id: &str) -> Vec<(String, String)> {
        let mut context = vec![
            ("aws:ssm:SessionId".to_owned(), session_id.to_owned()),
            ("aws:ssm:TargetId".to_owned(), target_id.to_owned()),
        ];
        if let Some(c) = &self.challenge {
            context.push(("aws:ssm:RandomChallenge".to_owned(), c.clone()));
        }
        context
    }
}

/// The bytes KMS returns for a data key.
pub const DATA_KEY_BYTES: usize = 64;

/// AES-256-GCM keys for one direction each.
pub struct Cipher {
    seal: LessSafeKey,
    open: LessSafeKey,
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher")
    }
}

/// Which end of the session the keys are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Client,
    Agent,
}

impl Cipher {
    /// The keys from a 64-byte data key: the agent seals with the first half.
    pub fn new(plaintext: &[u8], end: End) -> Option<Cipher> {
        if plaintext.len() != DATA_KEY_BYTES {
            return None;
        }
        let (agent, client) = plaintext.split_at(DATA_KEY_BYTES / 2);
        let key = |k: &[u8]| UnboundKey::new(&AES_256_GCM, k).ok().map(LessSafeKey::new);
        let (seal, open) = match end {
            End::Client => (key(client)?, key(agent)?),
            End::Agent => (key(agent)?, key(client)?),
        };
        Some(Cipher { seal, open })
    }

    /// `nonce || AES-GCM(plaintext) || tag`.
    pub fn seal(&self, nonce: [u8; NONCE_LEN], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + AES_256_GCM.tag_len());
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        // Sealing fails only for inputs beyond GCM's limit (64 GiB).
        if self.seal.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut body).is_ok() {
            out.extend_from_slice(&body);
        }
        out
    }

    /// The plaintext of [`Cipher::seal`]'s output, or `None` if it was not
    /// sealed with the other end's key (or was altered).
    pub fn open(&self, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self.open.open_in_place(nonce, Aad::empty(), &mut body).ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Vec<u8> {
        (0..64u8).collect()
    }

    #[test]
    fn each_end_opens_what_the_other_sealed_and_nothing_else() {
        let client = Cipher::new(&key(), End::Client).expect("64 bytes");
        let agent = Cipher::new(&key(), End::Agent).expect("64 bytes");
        let sealed = client.seal([7; 12], b"SELECT 1;");
        assert_eq!(sealed.len(), 12 + 9 + 16);
        assert_eq!(&sealed[..12], &[7; 12], "the nonce goes first");
        assert_eq!(agent.open(&sealed).as_deref(), Some(&b"SELECT 1;"[..]));
        assert_eq!(client.open(&sealed), None, "our own key does not open what we sealed");
        let back = agent.seal([9; 12], b"1 row");
        assert_eq!(client.open(&back).as_deref(), Some(&b"1 row"[..]));
        let mut tampered = back.clone();
        tampered[20] ^= 1;
        assert_eq!(client.open(&tampered), None);
        assert_eq!(client.open(&back[..20]), None, "too short");
        assert!(Cipher::new(&key()[..32], End::Client).is_none());
    }

    /// The halves as upstream splits them: the agent seals with bytes 0..32.
    #[test]
    fn the_agent_seals_with_the_first_half() {
        let k = key();
        let first = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k[..32]).expect("key"));
        let mut body = b"hello".to_vec();
        first.seal_in_place_append_tag(Nonce::assume_unique_for_key([1; 12]), Aad::empty(), &mut body).expect("seal");
        let sealed: Vec<u8> = [1u8; 12].iter().copied().chain(body).collect();
        let client = Cipher::new(&k, End::Client).expect("64 bytes");
        assert_eq!(client.open(&sealed).as_deref(), Some(&b"hello"[..]));
    }

    #[test]
    fn the_context_names_session_target_and_challenge() {
        let plain = DataKeyRequest { key_id: "alias/ssm".into(), challenge: None };
        assert_eq!(plain.context("s-1", "i-1").len(), 2);
        let with = DataKeyRequest { challenge: Some("cmFuZG9t".into()), ..plain };
        assert!(with.context("s-1", "i-1").contains(&("aws:ssm:RandomChallenge".into(), "cmFuZG9t".into())));
        assert!(!format!("{:?}", DataKey { ciphertext: vec![1], plaintext: vec![0x42; 64] }).contains("66"));
    }
}
