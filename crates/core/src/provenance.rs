//! Signed run provenance: an in-toto Statement v1 carrying a SLSA Provenance v1
//! predicate, wrapped in a DSSE envelope and signed with ed25519.
//!
//! - Statement: <https://github.com/in-toto/attestation/blob/main/spec/v1/statement.md>
//! - SLSA Provenance v1: <https://slsa.dev/spec/v1.0/provenance>
//! - DSSE (envelope and PAE): <https://github.com/secure-systems-lab/dsse/blob/master/protocol.md>
//!
//! Keys live under `<home>/keys/`: `provenance.ed25519.key` (PKCS#8 PEM, 0600) and
//! `provenance.ed25519.pub` (SubjectPublicKeyInfo PEM, the format `openssl pkey
//! -pubin` reads). A public key may also be given as the raw 32 bytes in base64.
//! Verification is offline: the envelope file and the public key are all it needs.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const SLSA_PROVENANCE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// DSSE `payloadType` for an in-toto statement.
pub const PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";
/// Identifies the shape of `buildDefinition` below (a URN: it is a name, not a
/// place to fetch).
pub const BUILD_TYPE: &str = "urn:bot-bottle:run:v1";

/// File names under `<home>/keys/`.
pub const PRIVATE_KEY_FILE: &str = "provenance.ed25519.key";
pub const PUBLIC_KEY_FILE: &str = "provenance.ed25519.pub";

// DER prefixes of the two fixed-size ed25519 encodings (RFC 8410): with them a
// PEM key is a prefix plus 32 bytes, and no ASN.1 library is needed.
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Every way provenance signing or verification can fail.
#[derive(Debug, thiserror::Error)]
pub enum ProvenanceError {
    #[error("cannot read `{path}`")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write `{path}`")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` is not an ed25519 {what} key: {detail}")]
    BadKey {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error(
        "signing key `{path}` is readable by others (mode {mode:o})\nhint: run `chmod 600 {path}`"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error("`{path}` is not a DSSE envelope: {detail}")]
    BadEnvelope { path: PathBuf, detail: String },
    #[error("envelope payload type is `{found}`, expected `{PAYLOAD_TYPE}`")]
    PayloadType { found: String },
    #[error("envelope has no signature")]
    Unsigned,
    #[error(
        "no envelope signature verifies with key `{key_id}`\nhint: the payload was changed after signing, or it was signed with another key"
    )]
    BadSignature { key_id: String },
    #[error("signed payload is not an in-toto statement: {detail}")]
    BadStatement { detail: String },
    #[error("cannot serialize the statement")]
    Serialize(#[source] serde_json::Error),
}

/// An artifact named with its digests (in-toto `ResourceDescriptor`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResourceDescriptor {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub uri: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub digest: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, serde_json::Value>,
}

impl ResourceDescriptor {
    /// A descriptor with one digest, e.g. `("sha256", hex)` or `("gitCommit", sha)`.
    #[must_use]
    pub fn new(name: impl Into<String>, algorithm: &str, digest: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            uri: String::new(),
            digest: BTreeMap::from([(algorithm.to_owned(), digest.into())]),
            annotations: BTreeMap::new(),
        }
    }
}

/// The forge issue a run worked on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssueRef {
    pub owner: String,
    pub repo: String,
    pub number: u64,
}

/// What started the run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Trigger {
    /// `cli`, `issue`, `comment`, `resume`, …
    pub kind: String,
    /// The webhook delivery UUID, when a webhook started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_id: Option<String>,
    /// The comment that resumed the run, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment_id: Option<u64>,
}

/// `buildDefinition.externalParameters`: what the caller chose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExternalParameters {
    pub agent: String,
    pub provider: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    pub bottles: Vec<String>,
    /// `sha256:<hex>` of the resolved egress policy.
    pub policy_digest: String,
    /// `sha256:<hex>` of the prompt (the prompt itself may hold private text).
    pub prompt_digest: String,
    /// The agent CLI the bottle image pins, e.g. `@anthropic-ai/claude-code@2.1.328`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cli: Option<String>,
    /// `sha256:<hex>` over the manifests the bottle runs on (its snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifests_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issue: Option<IssueRef>,
    pub trigger: Trigger,
}

/// `buildDefinition.internalParameters`: what bot-bottle decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InternalParameters {
    pub slug: String,
    pub backend: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildDefinition {
    pub build_type: String,
    pub external_parameters: ExternalParameters,
    pub internal_parameters: InternalParameters,
    /// The base commit (`gitCommit` digest) and the images (`sha256` digests).
    pub resolved_dependencies: Vec<ResourceDescriptor>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Builder {
    pub id: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub version: BTreeMap<String, String>,
}

/// `runDetails.metadata`, with bot-bottle's outcome fields beside SLSA's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunMetadata {
    pub invocation_id: String,
    pub started_on: String,
    pub finished_on: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// How the session ended: `exited`, `gateway-failed`, `interrupted`, `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// Operations a human approved during the run (none are asked for yet: 0).
    #[serde(default)]
    pub approvals: u64,
    pub watchdog_fired: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunDetails {
    pub builder: Builder,
    pub metadata: RunMetadata,
    /// `egress-audit` (digest + summary), `dlp` (result), `forge-ops` (digest).
    pub byproducts: Vec<ResourceDescriptor>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SlsaProvenance {
    pub build_definition: BuildDefinition,
    pub run_details: RunDetails,
}

/// An in-toto Statement v1 whose predicate is SLSA Provenance v1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Statement {
    #[serde(rename = "_type")]
    pub statement_type: String,
    pub subject: Vec<ResourceDescriptor>,
    pub predicate_type: String,
    pub predicate: SlsaProvenance,
}

/// Counts from the egress audit log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressSummary {
    /// Request and CONNECT events.
    pub requests: u64,
    pub allowed: u64,
    pub blocked: u64,
    /// Blocks counted in a rate-limit summary instead of written one by one.
    pub held: u64,
    /// Direct attempts the tripwire caught (not through the gateway).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub direct: u64,
    /// Lines of the log that could not be read as events (skipped, not counted).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unreadable_lines: u64,
    /// Allowed and blocked requests per host, for at most [`MAX_SUMMARY_HOSTS`] hosts;
    /// the rest are added up under [`OTHER_HOSTS`].
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hosts: BTreeMap<String, HostCounts>,
}

/// Allowed and blocked request counts of one host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCounts {
    pub allowed: u64,
    pub blocked: u64,
}

/// Hosts listed one by one in [`EgressSummary::hosts`]: the agent picks host names, and
/// the summary must stay small whatever it tries.
pub const MAX_SUMMARY_HOSTS: usize = 256;
/// The key the hosts past [`MAX_SUMMARY_HOSTS`] are counted under (not a host name:
/// host names have no parentheses).
pub const OTHER_HOSTS: &str = "(other hosts)";

#[allow(clippy::trivially_copy_pass_by_ref)] // serde's skip_serializing_if passes a reference
fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A hash-chained log's head: the last line's sequence number and hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogHead {
    pub seq: u64,
    pub hash: String,
}

/// Outcome of DLP scanning during the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DlpResult {
    Clean,
    Findings { count: u64 },
    NotRun,
}

/// Everything one run contributes to its provenance, as plain data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunRecord {
    pub slug: String,
    pub agent: String,
    pub provider: String,
    pub model: Option<String>,
    pub bottles: Vec<String>,
    pub backend: String,
    pub policy_digest: String,
    pub prompt_digest: String,
    pub issue: Option<IssueRef>,
    pub trigger: Trigger,
    /// Repository URI (or name) and commit SHA the run started from.
    pub base_commit: Option<(String, String)>,
    /// Image reference and its `sha256:` id.
    pub images: Vec<(String, String)>,
    /// RFC 3339.
    pub started_at: String,
    pub finished_at: String,
    pub exit_code: Option<i32>,
    pub watchdog_fired: bool,
    pub egress_audit_digest: Option<String>,
    /// The egress log's head when the session ended.
    pub egress_audit_head: Option<LogHead>,
    pub egress_summary: EgressSummary,
    pub dlp: DlpResult,
    pub forge_ops_digest: Option<String>,
    /// The forge-ops log's head (no forge-ops log exists yet: `None`).
    pub forge_ops_head: Option<LogHead>,
    /// The agent CLI package and version, when the provider pins one.
    pub cli: Option<String>,
    pub manifests_digest: Option<String>,
    /// See [`RunMetadata::outcome`].
    pub outcome: Option<String>,
    pub approvals: u64,
    /// What the run produced, e.g. `("refs/heads/bot/issue-17", "gitCommit", sha)`.
    pub subjects: Vec<ResourceDescriptor>,
    pub builder_version: String,
}

/// `sha256:<hex>` of some bytes, the digest form used in `externalParameters`.
#[must_use]
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Plain hex SHA-256 of a file (files only: no streaming from sockets).
pub fn sha256_file(path: &Path) -> Result<String, ProvenanceError> {
    let bytes = fs_err::read(path).map_err(|source| ProvenanceError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(hex::encode(Sha256::digest(bytes)))
}

fn strip_sha256(digest: &str) -> String {
    digest.strip_prefix("sha256:").unwrap_or(digest).to_owned()
}

impl Statement {
    /// Build the statement for one run.
    #[must_use]
    pub fn from_run(run: &RunRecord) -> Self {
        let mut resolved = Vec::new();
        if let Some((repo, sha)) = &run.base_commit {
            let mut commit = ResourceDescriptor::new("base-commit", "gitCommit", sha.clone());
            commit.uri.clone_from(repo);
            resolved.push(commit);
        }
        for (reference, digest) in &run.images {
            resolved.push(ResourceDescriptor::new(
                reference.clone(),
                "sha256",
                strip_sha256(digest),
            ));
        }

        let mut byproducts = Vec::new();
        let mut egress = ResourceDescriptor {
            name: "egress-audit".to_owned(),
            uri: String::new(),
            digest: BTreeMap::new(),
            annotations: BTreeMap::new(),
        };
        if let Some(digest) = &run.egress_audit_digest {
            egress
                .digest
                .insert("sha256".to_owned(), strip_sha256(digest));
        }
        egress.annotations.insert(
            "summary".to_owned(),
            serde_json::to_value(&run.egress_summary).unwrap_or_default(),
        );
        if let Some(head) = &run.egress_audit_head {
            egress.annotations.insert(
                "head".to_owned(),
                serde_json::to_value(head).unwrap_or_default(),
            );
        }
        byproducts.push(egress);
        let mut dlp = ResourceDescriptor {
            name: "dlp".to_owned(),
            uri: String::new(),
            digest: BTreeMap::new(),
            annotations: BTreeMap::new(),
        };
        dlp.annotations.insert(
            "result".to_owned(),
            serde_json::to_value(run.dlp).unwrap_or_default(),
        );
        byproducts.push(dlp);
        if run.forge_ops_digest.is_some() || run.forge_ops_head.is_some() {
            let mut ops = ResourceDescriptor::new("forge-ops", "sha256", "");
            ops.digest.clear();
            if let Some(digest) = &run.forge_ops_digest {
                ops.digest.insert("sha256".to_owned(), strip_sha256(digest));
            }
            if let Some(head) = &run.forge_ops_head {
                ops.annotations.insert(
                    "head".to_owned(),
                    serde_json::to_value(head).unwrap_or_default(),
                );
            }
            byproducts.push(ops);
        }

        Self {
            statement_type: STATEMENT_TYPE.to_owned(),
            subject: run.subjects.clone(),
            predicate_type: SLSA_PROVENANCE_TYPE.to_owned(),
            predicate: SlsaProvenance {
                build_definition: BuildDefinition {
                    build_type: BUILD_TYPE.to_owned(),
                    external_parameters: ExternalParameters {
                        agent: run.agent.clone(),
                        provider: run.provider.clone(),
                        model: run.model.clone(),
                        bottles: run.bottles.clone(),
                        policy_digest: run.policy_digest.clone(),
                        prompt_digest: run.prompt_digest.clone(),
                        cli: run.cli.clone(),
                        manifests_digest: run.manifests_digest.clone(),
                        issue: run.issue.clone(),
                        trigger: run.trigger.clone(),
                    },
                    internal_parameters: InternalParameters {
                        slug: run.slug.clone(),
                        backend: run.backend.clone(),
                    },
                    resolved_dependencies: resolved,
                },
                run_details: RunDetails {
                    builder: Builder {
                        id: "urn:bot-bottle:builder".to_owned(),
                        version: BTreeMap::from([(
                            "bot-bottle".to_owned(),
                            run.builder_version.clone(),
                        )]),
                    },
                    metadata: RunMetadata {
                        invocation_id: run.slug.clone(),
                        started_on: run.started_at.clone(),
                        finished_on: run.finished_at.clone(),
                        exit_code: run.exit_code,
                        outcome: run.outcome.clone(),
                        approvals: run.approvals,
                        watchdog_fired: run.watchdog_fired,
                    },
                    byproducts,
                },
            },
        }
    }
}

impl Statement {
    /// The egress log head this statement records (`runDetails.byproducts`, the
    /// `egress-audit` entry's `head` annotation), if it records one.
    #[must_use]
    pub fn egress_head(&self) -> Option<LogHead> {
        self.predicate
            .run_details
            .byproducts
            .iter()
            .find(|b| b.name == "egress-audit")
            .and_then(|b| b.annotations.get("head"))
            .and_then(|head| serde_json::from_value(head.clone()).ok())
    }
}

/// A DSSE envelope (JSON form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Envelope {
    /// Base64 of the serialized statement.
    pub payload: String,
    pub payload_type: String,
    pub signatures: Vec<EnvelopeSignature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeSignature {
    #[serde(default)]
    pub keyid: String,
    /// Base64 of the 64-byte ed25519 signature over the PAE.
    pub sig: String,
}

/// A statement whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedProvenance {
    pub statement: Statement,
    pub key_id: String,
}

/// DSSE pre-authentication encoding: what is actually signed. Binding the
/// payload type into the signed bytes stops a signature from being replayed on
/// the same bytes under another type.
#[must_use]
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {payload_type} {} ",
        payload_type.len(),
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// Key id: hex SHA-256 of the raw 32-byte public key.
#[must_use]
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Sign a statement into an envelope.
pub fn sign_statement(
    statement: &Statement,
    key: &SigningKey,
) -> Result<Envelope, ProvenanceError> {
    let payload = serde_json::to_vec(statement).map_err(ProvenanceError::Serialize)?;
    let signature = key.sign(&pae(PAYLOAD_TYPE, &payload));
    Ok(Envelope {
        payload: BASE64.encode(&payload),
        payload_type: PAYLOAD_TYPE.to_owned(),
        signatures: vec![EnvelopeSignature {
            keyid: key_id(&key.verifying_key()),
            sig: BASE64.encode(signature.to_bytes()),
        }],
    })
}

/// Check an envelope against a public key, then decode its statement. Any one
/// signature that verifies is enough (DSSE allows several signers).
pub fn verify_envelope(
    envelope: &Envelope,
    key: &VerifyingKey,
) -> Result<VerifiedProvenance, ProvenanceError> {
    if envelope.payload_type != PAYLOAD_TYPE {
        return Err(ProvenanceError::PayloadType {
            found: envelope.payload_type.clone(),
        });
    }
    if envelope.signatures.is_empty() {
        return Err(ProvenanceError::Unsigned);
    }
    let key_id = key_id(key);
    let bad = || ProvenanceError::BadSignature {
        key_id: key_id.clone(),
    };
    let payload = BASE64.decode(&envelope.payload).map_err(|_| bad())?;
    let message = pae(&envelope.payload_type, &payload);
    let verified = envelope.signatures.iter().any(|entry| {
        BASE64
            .decode(&entry.sig)
            .ok()
            .and_then(|bytes| <[u8; 64]>::try_from(bytes).ok())
            .is_some_and(|bytes| {
                key.verify_strict(&message, &Signature::from_bytes(&bytes))
                    .is_ok()
            })
    });
    if !verified {
        return Err(bad());
    }
    let statement: Statement =
        serde_json::from_slice(&payload).map_err(|e| ProvenanceError::BadStatement {
            detail: e.to_string(),
        })?;
    if statement.statement_type != STATEMENT_TYPE
        || statement.predicate_type != SLSA_PROVENANCE_TYPE
    {
        return Err(ProvenanceError::BadStatement {
            detail: format!(
                "type `{}` with predicate `{}`",
                statement.statement_type, statement.predicate_type
            ),
        });
    }
    Ok(VerifiedProvenance { statement, key_id })
}

/// Sign a run's statement with the key under `<home>/keys/`, creating the key
/// on first use.
pub fn sign_run(home: &Path, run: &RunRecord) -> Result<Envelope, ProvenanceError> {
    let keys = ProvenanceKeys::load_or_create(home)?;
    sign_statement(&Statement::from_run(run), &keys.signing_key)
}

/// Verify an envelope file offline with a public key file (PEM, or raw base64).
/// This is what `bot-bottle provenance verify FILE --key PUB` calls.
pub fn verify_envelope_file(
    path: &Path,
    public_key_path: &Path,
) -> Result<VerifiedProvenance, ProvenanceError> {
    let key = read_public_key(public_key_path)?;
    let text = fs_err::read_to_string(path).map_err(|source| ProvenanceError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let envelope: Envelope =
        serde_json::from_str(&text).map_err(|e| ProvenanceError::BadEnvelope {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    verify_envelope(&envelope, &key)
}

/// Write an envelope atomically (temp file 0600, fsync, rename).
pub fn write_envelope_file(path: &Path, envelope: &Envelope) -> Result<(), ProvenanceError> {
    let mut bytes = serde_json::to_vec_pretty(envelope).map_err(ProvenanceError::Serialize)?;
    bytes.push(b'\n');
    let temp = temp_sibling(path);
    write_new_file(&temp, &bytes, 0o600).map_err(|source| ProvenanceError::Write {
        path: temp.clone(),
        source,
    })?;
    fs_err::rename(&temp, path).map_err(|source| {
        let _ = std::fs::remove_file(&temp);
        ProvenanceError::Write {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(())
}

/// The provenance signing key under `<home>/keys/`, created on first use.
pub struct ProvenanceKeys {
    pub private_key_path: PathBuf,
    pub public_key_path: PathBuf,
    pub signing_key: SigningKey,
}

impl fmt::Debug for ProvenanceKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProvenanceKeys")
            .field("private_key_path", &self.private_key_path)
            .field("public_key_path", &self.public_key_path)
            .field("key_id", &key_id(&self.signing_key.verifying_key()))
            .finish_non_exhaustive()
    }
}

impl ProvenanceKeys {
    /// Load the key pair under `<home>/keys/`, generating it on first use. The
    /// private key is created 0600 (the directory 0700) and is refused later if
    /// its mode lets anyone else read it.
    pub fn load_or_create(home: &Path) -> Result<Self, ProvenanceError> {
        let dir = home.join("keys");
        let private_key_path = dir.join(PRIVATE_KEY_FILE);
        let public_key_path = dir.join(PUBLIC_KEY_FILE);
        let io_write = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ProvenanceError::Write { path, source }
        };
        if !private_key_path.exists() {
            fs_err::create_dir_all(&dir).map_err(io_write(&dir))?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
                .map_err(io_write(&dir))?;
            let seed: [u8; 32] = rand::random();
            let pem = private_key_pem(&SigningKey::from_bytes(&seed));
            // Write beside, then hard-link into place: the link fails if another
            // process created the key first, and nobody ever sees half a key.
            let temp = temp_sibling(&private_key_path);
            write_new_file(&temp, pem.as_bytes(), 0o600).map_err(io_write(&temp))?;
            let linked = std::fs::hard_link(&temp, &private_key_path);
            let _ = std::fs::remove_file(&temp);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_write(&private_key_path)(e)),
            }
        }
        let signing_key = read_private_key(&private_key_path)?;
        let public_pem = public_key_pem(&signing_key.verifying_key());
        let current = std::fs::read_to_string(&public_key_path).unwrap_or_default();
        if current != public_pem {
            let temp = temp_sibling(&public_key_path);
            write_new_file(&temp, public_pem.as_bytes(), 0o644).map_err(io_write(&temp))?;
            fs_err::rename(&temp, &public_key_path).map_err(io_write(&public_key_path))?;
        }
        Ok(Self {
            private_key_path,
            public_key_path,
            signing_key,
        })
    }

    /// The public key as SubjectPublicKeyInfo PEM, for `--key`.
    #[must_use]
    pub fn public_key_pem(&self) -> String {
        public_key_pem(&self.signing_key.verifying_key())
    }
}

fn temp_sibling(path: &Path) -> PathBuf {
    let suffix: u64 = rand::random();
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}-{suffix:016x}", std::process::id()));
    path.with_file_name(name)
}

fn write_new_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

fn pem(label: &str, der: &[u8]) -> String {
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        BASE64.encode(der)
    )
}

/// PKCS#8 PEM of an ed25519 private key.
#[must_use]
pub fn private_key_pem(key: &SigningKey) -> String {
    let mut der = PKCS8_PREFIX.to_vec();
    der.extend_from_slice(&key.to_bytes());
    pem("PRIVATE KEY", &der)
}

/// SubjectPublicKeyInfo PEM of an ed25519 public key.
#[must_use]
pub fn public_key_pem(key: &VerifyingKey) -> String {
    let mut der = SPKI_PREFIX.to_vec();
    der.extend_from_slice(key.as_bytes());
    pem("PUBLIC KEY", &der)
}

fn decode_key_text(text: &str, label: &str) -> Result<Vec<u8>, String> {
    let trimmed = text.trim();
    let body: String = if trimmed.starts_with("-----BEGIN") {
        let begin = format!("-----BEGIN {label}-----");
        let end = format!("-----END {label}-----");
        let inner = trimmed
            .strip_prefix(&begin)
            .and_then(|rest| rest.trim_end().strip_suffix(&end))
            .ok_or_else(|| format!("expected a `{label}` PEM block"))?;
        inner.split_whitespace().collect()
    } else {
        trimmed.to_owned()
    };
    BASE64
        .decode(body)
        .map_err(|e| format!("invalid base64: {e}"))
}

/// Read a public key: SubjectPublicKeyInfo PEM, or the raw 32 bytes in base64.
pub fn read_public_key(path: &Path) -> Result<VerifyingKey, ProvenanceError> {
    let text = fs_err::read_to_string(path).map_err(|source| ProvenanceError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |detail: String| ProvenanceError::BadKey {
        path: path.to_path_buf(),
        what: "public",
        detail,
    };
    let bytes = decode_key_text(&text, "PUBLIC KEY").map_err(bad)?;
    let raw = match bytes.len() {
        32 => bytes.as_slice(),
        44 if bytes.starts_with(&SPKI_PREFIX) => &bytes[SPKI_PREFIX.len()..],
        n => return Err(bad(format!("unexpected length {n} bytes"))),
    };
    let raw: [u8; 32] = raw
        .try_into()
        .map_err(|_| bad("unexpected length".to_owned()))?;
    VerifyingKey::from_bytes(&raw).map_err(|e| bad(e.to_string()))
}

fn read_private_key(path: &Path) -> Result<SigningKey, ProvenanceError> {
    let metadata = fs_err::metadata(path).map_err(|source| ProvenanceError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ProvenanceError::KeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = fs_err::read_to_string(path).map_err(|source| ProvenanceError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |detail: String| ProvenanceError::BadKey {
        path: path.to_path_buf(),
        what: "private",
        detail,
    };
    let bytes = decode_key_text(&text, "PRIVATE KEY").map_err(bad)?;
    let seed = bytes
        .strip_prefix(&PKCS8_PREFIX)
        .ok_or_else(|| bad("not a PKCS#8 ed25519 key".to_owned()))?;
    let seed: [u8; 32] = seed
        .try_into()
        .map_err(|_| bad(format!("unexpected length {} bytes", bytes.len())))?;
    Ok(SigningKey::from_bytes(&seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run() -> RunRecord {
        RunRecord {
            slug: "implementer-ab12c".to_owned(),
            agent: "implementer".to_owned(),
            provider: "claude".to_owned(),
            model: Some("claude-sonnet-4".to_owned()),
            bottles: vec!["rust-dev".to_owned()],
            backend: "docker".to_owned(),
            policy_digest: sha256_digest(b"policy"),
            prompt_digest: sha256_digest(b"fix the bug"),
            issue: Some(IssueRef {
                owner: "acme".to_owned(),
                repo: "widget".to_owned(),
                number: 17,
            }),
            trigger: Trigger {
                kind: "issue".to_owned(),
                delivery_id: Some("f6266f16-1bf3-46a5-9ea4-602e06ead473".to_owned()),
                comment_id: None,
            },
            base_commit: Some((
                "acme/widget".to_owned(),
                "4b825dc642cb6eb9a060e54bf8d69288fbee4904".to_owned(),
            )),
            images: vec![(
                "bot-bottle/rust-dev:abc".to_owned(),
                format!("sha256:{}", "a".repeat(64)),
            )],
            started_at: "2026-11-24T08:00:00Z".to_owned(),
            finished_at: "2026-11-24T08:10:00Z".to_owned(),
            exit_code: Some(0),
            watchdog_fired: false,
            egress_audit_digest: Some(sha256_digest(b"audit")),
            egress_audit_head: Some(LogHead {
                seq: 41,
                hash: "c".repeat(64),
            }),
            egress_summary: EgressSummary {
                requests: 12,
                allowed: 10,
                blocked: 2,
                held: 0,
                ..EgressSummary::default()
            },
            dlp: DlpResult::Clean,
            forge_ops_digest: Some(sha256_digest(b"ops")),
            forge_ops_head: None,
            cli: Some("@anthropic-ai/claude-code@2.1.328".to_owned()),
            manifests_digest: Some(sha256_digest(b"manifests")),
            outcome: Some("exited".to_owned()),
            approvals: 0,
            subjects: vec![ResourceDescriptor::new(
                "refs/heads/bot/issue-17",
                "gitCommit",
                "1111111111111111111111111111111111111111",
            )],
            builder_version: "0.1.0".to_owned(),
        }
    }

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[7u8; 32])
    }

    #[test]
    fn pae_matches_the_dsse_spec_vector() {
        assert_eq!(
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec(),
            pae("http://example.com/HelloWorld", b"hello world")
        );
    }

    #[test]
    fn statement_has_the_in_toto_and_slsa_shape() {
        let value = serde_json::to_value(Statement::from_run(&run())).expect("json");
        assert_eq!(STATEMENT_TYPE, value["_type"]);
        assert_eq!(SLSA_PROVENANCE_TYPE, value["predicateType"]);
        let build = &value["predicate"]["buildDefinition"];
        assert_eq!(BUILD_TYPE, build["buildType"]);
        assert_eq!(
            serde_json::json!({
                "agent": "implementer",
                "provider": "claude",
                "model": "claude-sonnet-4",
                "bottles": ["rust-dev"],
                "policyDigest": sha256_digest(b"policy"),
                "promptDigest": sha256_digest(b"fix the bug"),
                "cli": "@anthropic-ai/claude-code@2.1.328",
                "manifestsDigest": sha256_digest(b"manifests"),
                "issue": {"owner": "acme", "repo": "widget", "number": 17},
                "trigger": {"kind": "issue", "deliveryId": "f6266f16-1bf3-46a5-9ea4-602e06ead473"},
            }),
            build["externalParameters"]
        );
        assert_eq!(
            serde_json::json!([
                {"name": "base-commit", "uri": "acme/widget",
                 "digest": {"gitCommit": "4b825dc642cb6eb9a060e54bf8d69288fbee4904"}},
                {"name": "bot-bottle/rust-dev:abc", "digest": {"sha256": "a".repeat(64)}},
            ]),
            build["resolvedDependencies"]
        );
        let details = &value["predicate"]["runDetails"];
        assert_eq!(
            serde_json::json!({
                "invocationId": "implementer-ab12c",
                "startedOn": "2026-11-24T08:00:00Z",
                "finishedOn": "2026-11-24T08:10:00Z",
                "exitCode": 0,
                "outcome": "exited",
                "approvals": 0,
                "watchdogFired": false,
            }),
            details["metadata"]
        );
        let names: Vec<&str> = details["byproducts"]
            .as_array()
            .expect("array")
            .iter()
            .filter_map(|b| b["name"].as_str())
            .collect();
        assert_eq!(vec!["egress-audit", "dlp", "forge-ops"], names);
        assert_eq!(
            serde_json::json!({"requests": 12, "allowed": 10, "blocked": 2, "held": 0}),
            details["byproducts"][0]["annotations"]["summary"]
        );
        assert_eq!(
            serde_json::json!({"seq": 41, "hash": "c".repeat(64)}),
            details["byproducts"][0]["annotations"]["head"]
        );
        assert_eq!(
            serde_json::json!("clean"),
            details["byproducts"][1]["annotations"]["result"]
        );
    }

    #[test]
    fn recorded_egress_head_reads_back_from_the_statement() {
        let statement = Statement::from_run(&run());
        assert_eq!(
            Some(LogHead {
                seq: 41,
                hash: "c".repeat(64)
            }),
            statement.egress_head()
        );
        let mut headless = run();
        headless.egress_audit_head = None;
        assert_eq!(None, Statement::from_run(&headless).egress_head());
    }

    #[test]
    fn sign_then_verify_round_trips() {
        let statement = Statement::from_run(&run());
        let envelope = sign_statement(&statement, &key()).expect("sign");
        let verified = verify_envelope(&envelope, &key().verifying_key()).expect("verify");
        assert_eq!(statement, verified.statement);
        assert_eq!(key_id(&key().verifying_key()), verified.key_id);
    }

    #[test]
    fn tampered_payload_fails_verification() {
        let envelope = sign_statement(&Statement::from_run(&run()), &key()).expect("sign");
        let mut statement: serde_json::Value =
            serde_json::from_slice(&BASE64.decode(&envelope.payload).expect("b64")).expect("json");
        statement["predicate"]["runDetails"]["metadata"]["exitCode"] = 1.into();
        let tampered = Envelope {
            payload: BASE64.encode(serde_json::to_vec(&statement).expect("json")),
            ..envelope.clone()
        };
        assert!(matches!(
            verify_envelope(&tampered, &key().verifying_key()),
            Err(ProvenanceError::BadSignature { .. })
        ));
        // The same bytes under another payload type do not verify either.
        let retyped = Envelope {
            payload_type: "application/json".to_owned(),
            ..envelope.clone()
        };
        assert!(matches!(
            verify_envelope(&retyped, &key().verifying_key()),
            Err(ProvenanceError::PayloadType { .. })
        ));
        let other = SigningKey::from_bytes(&[9u8; 32]).verifying_key();
        assert!(matches!(
            verify_envelope(&envelope, &other),
            Err(ProvenanceError::BadSignature { .. })
        ));
        let unsigned = Envelope {
            signatures: vec![],
            ..envelope
        };
        assert!(matches!(
            verify_envelope(&unsigned, &key().verifying_key()),
            Err(ProvenanceError::Unsigned)
        ));
    }

    #[test]
    fn keys_are_created_once_with_private_permissions() {
        let home = tempfile::tempdir().expect("tempdir");
        let keys = ProvenanceKeys::load_or_create(home.path()).expect("create");
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        assert_eq!(0o600, mode(&keys.private_key_path));
        assert_eq!(0o700, mode(&home.path().join("keys")));
        let again = ProvenanceKeys::load_or_create(home.path()).expect("load");
        assert_eq!(
            keys.signing_key.to_bytes(),
            again.signing_key.to_bytes(),
            "the second call must reuse the key"
        );
        let exported = read_public_key(&keys.public_key_path).expect("public");
        assert_eq!(keys.signing_key.verifying_key(), exported);
        assert!(
            keys.public_key_pem()
                .starts_with("-----BEGIN PUBLIC KEY-----\n")
        );
    }

    #[test]
    fn group_readable_private_key_is_refused() {
        let home = tempfile::tempdir().expect("tempdir");
        let keys = ProvenanceKeys::load_or_create(home.path()).expect("create");
        std::fs::set_permissions(
            &keys.private_key_path,
            std::fs::Permissions::from_mode(0o640),
        )
        .expect("chmod");
        let error = ProvenanceKeys::load_or_create(home.path()).expect_err("refused");
        assert!(error.to_string().contains("hint: run `chmod 600"));
    }

    #[test]
    fn public_key_reads_raw_base64_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key.b64");
        std::fs::write(&path, BASE64.encode(key().verifying_key().as_bytes())).expect("write");
        assert_eq!(
            key().verifying_key(),
            read_public_key(&path).expect("raw key")
        );
        std::fs::write(&path, "not a key").expect("write");
        assert!(matches!(
            read_public_key(&path),
            Err(ProvenanceError::BadKey { .. })
        ));
    }

    #[test]
    fn envelope_files_verify_offline_and_tampering_is_caught() {
        let home = tempfile::tempdir().expect("tempdir");
        let envelope = sign_run(home.path(), &run()).expect("sign");
        let keys = ProvenanceKeys::load_or_create(home.path()).expect("keys");
        let path = home.path().join("provenance.json");
        write_envelope_file(&path, &envelope).expect("write");
        let mode = std::fs::metadata(&path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(0o600, mode, "the envelope is private to the host user");
        let verified = verify_envelope_file(&path, &keys.public_key_path).expect("verify");
        assert_eq!(
            "implementer-ab12c",
            verified
                .statement
                .predicate
                .run_details
                .metadata
                .invocation_id
        );

        let text = std::fs::read_to_string(&path).expect("read");
        let mut value: serde_json::Value = serde_json::from_str(&text).expect("json");
        let payload = value["payload"].as_str().expect("payload").to_owned();
        let decoded = String::from_utf8(BASE64.decode(payload).expect("b64")).expect("utf8");
        let forged = decoded.replace("\"watchdogFired\":false", "\"watchdogFired\":true");
        assert_ne!(decoded, forged);
        value["payload"] = BASE64.encode(forged).into();
        std::fs::write(&path, value.to_string()).expect("write");
        assert!(matches!(
            verify_envelope_file(&path, &keys.public_key_path),
            Err(ProvenanceError::BadSignature { .. })
        ));
    }
}
