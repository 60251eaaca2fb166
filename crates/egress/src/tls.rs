//! TLS for interception: the bottle's CA, leaf certificates minted per host name, and
//! the client configurations for the upstream side.
//!
//! Every rustls config here is built with the ring provider explicitly, so the gateway
//! does not depend on a process-wide default provider being installed.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// The CA certificate file in a CA directory.
pub const CA_CERT_FILE: &str = "ca.pem";
/// The CA private key file in a CA directory (mode 0600; it never enters a bottle).
pub const CA_KEY_FILE: &str = "ca-key.pem";

/// Leaf certificates kept at most; past this the cache starts over. Each entry is a
/// small certificate, and a bottle talks to a handful of hosts.
const LEAF_CACHE_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read or write the CA at `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the CA at `{}` cannot be loaded: {reason}\nhint: move the directory away to have a new CA generated (bottles holding the old certificate must be restarted)",
        path.display()
    )]
    BadCa { path: PathBuf, reason: String },
    #[error("cannot mint a certificate: {0}")]
    Mint(String),
    #[error("invalid extra upstream root certificate: {0}")]
    BadRoot(String),
    #[error("no upstream root certificates: neither the system store nor extra roots gave any")]
    NoRoots,
    #[error("rustls configuration failed: {0}")]
    Config(#[from] rustls::Error),
}

/// A host name and the ALPN protocols offered to the client.
type ConfigKey = (String, Vec<Vec<u8>>);

/// A bottle's interception CA. The certificate goes into the bottle; the key stays here.
pub struct CertificateAuthority {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    /// One key for every leaf: minting then costs one signature, not a key generation.
    leaf_key: Arc<dyn rustls::sign::SigningKey>,
    leaf_key_pair: KeyPair,
    cache: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// One server config per (host, ALPN offer), so its session cache lets clients resume.
    configs: Mutex<HashMap<ConfigKey, Arc<rustls::ServerConfig>>>,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "bot-bottle");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    params
}

impl CertificateAuthority {
    /// A new CA held in memory only.
    ///
    /// # Errors
    /// Key generation or signing failed.
    pub fn generate(common_name: &str) -> Result<Self, TlsError> {
        let key = KeyPair::generate().map_err(|e| TlsError::Mint(e.to_string()))?;
        let params = ca_params(common_name);
        let cert = params
            .self_signed(&key)
            .map_err(|e| TlsError::Mint(e.to_string()))?;
        Self::from_parts(cert.pem(), cert.der().clone(), Issuer::new(params, key))
    }

    /// Loads the CA kept in `dir` (`ca.pem`, `ca-key.pem`), or generates and stores one
    /// there: the directory 0700, both files 0600. A bottle keeps the same CA across
    /// freeze and resume, so the certificate it trusts stays valid.
    ///
    /// # Errors
    /// I/O errors, or files that do not hold a CA and its key.
    pub fn load_or_create(dir: &Path, common_name: &str) -> Result<Self, TlsError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TlsError::Io { path, source }
        };
        if cert_path.exists() || key_path.exists() {
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            let bad = |reason: String| TlsError::BadCa {
                path: dir.to_path_buf(),
                reason,
            };
            let key = KeyPair::from_pem(&key_pem).map_err(|e| bad(e.to_string()))?;
            let issuer =
                Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| bad(e.to_string()))?;
            let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
                .next()
                .ok_or_else(|| bad("no certificate in `ca.pem`".into()))?
                .map_err(|e| bad(e.to_string()))?;
            return Self::from_parts(cert_pem, der, issuer);
        }
        create_private_dir(dir).map_err(io(dir))?;
        let key = KeyPair::generate().map_err(|e| TlsError::Mint(e.to_string()))?;
        let params = ca_params(common_name);
        let cert = params
            .self_signed(&key)
            .map_err(|e| TlsError::Mint(e.to_string()))?;
        write_private(&key_path, key.serialize_pem().as_bytes()).map_err(io(&key_path))?;
        write_private(&cert_path, cert.pem().as_bytes()).map_err(io(&cert_path))?;
        Self::from_parts(cert.pem(), cert.der().clone(), Issuer::new(params, key))
    }

    fn from_parts(
        cert_pem: String,
        cert_der: CertificateDer<'static>,
        issuer: Issuer<'static, KeyPair>,
    ) -> Result<Self, TlsError> {
        let leaf_key_pair = KeyPair::generate().map_err(|e| TlsError::Mint(e.to_string()))?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key_pair.serialize_der()));
        let leaf_key = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(der)?;
        Ok(CertificateAuthority {
            cert_pem,
            cert_der,
            issuer,
            leaf_key,
            leaf_key_pair,
            cache: Mutex::new(HashMap::new()),
            configs: Mutex::new(HashMap::new()),
        })
    }

    /// The CA certificate, PEM: what the bottle installs and points every per-tool
    /// variable at (see [`crate::CA_ENV_VARS`]).
    #[must_use]
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    #[must_use]
    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// The leaf for `host` (a DNS name or an IP literal), minted on first use.
    pub(crate) fn leaf(&self, host: &str) -> Result<Arc<CertifiedKey>, TlsError> {
        let key = host.to_ascii_lowercase();
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(found) = cache.get(&key) {
            return Ok(found.clone());
        }
        let mut params =
            CertificateParams::new(vec![key.clone()]).map_err(|e| TlsError::Mint(e.to_string()))?;
        params.distinguished_name.push(DnType::CommonName, &key);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(30);
        let cert = params
            .signed_by(&self.leaf_key_pair, &self.issuer)
            .map_err(|e| TlsError::Mint(e.to_string()))?;
        let certified = Arc::new(CertifiedKey::new(
            vec![cert.der().clone(), self.cert_der.clone()],
            self.leaf_key.clone(),
        ));
        if cache.len() >= LEAF_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key, certified.clone());
        Ok(certified)
    }

    /// A server config presenting the leaf for `host`, offering exactly `alpn`.
    pub(crate) fn server_config(
        &self,
        host: &str,
        alpn: Vec<Vec<u8>>,
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let key = (host.to_ascii_lowercase(), alpn.clone());
        if let Some(config) = self
            .configs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&key)
        {
            return Ok(config.clone());
        }
        let leaf = self.leaf(host)?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(FixedLeaf(leaf)));
        config.alpn_protocols = alpn;
        let config = Arc::new(config);
        let mut configs = self
            .configs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if configs.len() >= LEAF_CACHE_MAX {
            configs.clear();
        }
        configs.insert(key, config.clone());
        Ok(config)
    }
}

#[derive(Debug)]
struct FixedLeaf(Arc<CertifiedKey>);

impl ResolvesServerCert for FixedLeaf {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

pub(crate) const ALPN_H2: &[u8] = b"h2";
pub(crate) const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Client configs for the upstream side, one per ALPN offer.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamTls {
    h2_and_h1: Arc<rustls::ClientConfig>,
    h1: Arc<rustls::ClientConfig>,
    bare: Arc<rustls::ClientConfig>,
}

impl UpstreamTls {
    pub(crate) fn new(
        extra_roots: &[CertificateDer<'static>],
        native_roots: bool,
    ) -> Result<Self, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        if native_roots {
            // Certificates the system store holds but rustls cannot parse are skipped,
            // as a browser would.
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
        }
        for cert in extra_roots {
            roots
                .add(cert.clone())
                .map_err(|e| TlsError::BadRoot(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(TlsError::NoRoots);
        }
        let roots = Arc::new(roots);
        let build = |alpn: &[&[u8]]| -> Result<Arc<rustls::ClientConfig>, TlsError> {
            let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(config))
        };
        Ok(UpstreamTls {
            h2_and_h1: build(&[ALPN_H2, ALPN_HTTP11])?,
            h1: build(&[ALPN_HTTP11])?,
            bare: build(&[])?,
        })
    }

    /// The config whose ALPN offer mirrors what the client offered, so that the upstream
    /// picks a protocol the client also speaks and no translation is needed.
    pub(crate) fn for_client_offer(&self, client_alpn: &[Vec<u8>]) -> Arc<rustls::ClientConfig> {
        if client_alpn.iter().any(|p| p == ALPN_H2) {
            self.h2_and_h1.clone()
        } else if client_alpn.iter().any(|p| p == ALPN_HTTP11) {
            self.h1.clone()
        } else {
            self.bare.clone()
        }
    }
}

/// Parses PEM certificates (for extra upstream roots).
///
/// # Errors
/// The text holds no certificate, or one that does not parse.
pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::BadRoot(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::BadRoot("no certificate in the PEM text".into()));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_is_stored_private_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_dir = dir.path().join("ca/bottle-abcde");
        let first =
            CertificateAuthority::load_or_create(&ca_dir, "bot-bottle test CA").expect("creates");
        let again = CertificateAuthority::load_or_create(&ca_dir, "ignored").expect("loads");
        assert_eq!(first.cert_pem(), again.cert_pem());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode(&ca_dir), 0o700);
            assert_eq!(mode(&ca_dir.join(CA_KEY_FILE)), 0o600);
            assert_eq!(mode(&ca_dir.join(CA_CERT_FILE)), 0o600);
        }
        assert!(!first.cert_pem().contains("PRIVATE KEY"));

        // A leaf minted by the reloaded CA verifies against the stored certificate.
        let leaf = again.leaf("api.example.test").expect("leaf");
        assert_eq!(leaf.cert.len(), 2);
        assert_eq!(&leaf.cert[1], first.cert_der());
        let cached = again.leaf("API.example.test").expect("leaf");
        assert!(Arc::ptr_eq(&leaf, &cached));
        again.leaf("127.0.0.1").expect("ip leaf");

        std::fs::write(ca_dir.join(CA_KEY_FILE), "garbage").expect("write");
        assert!(matches!(
            CertificateAuthority::load_or_create(&ca_dir, "x"),
            Err(TlsError::BadCa { .. })
        ));
    }
}
