//! `forger-coordinator credentials`: a new cluster's certificate authority, the coordinator's
//! certificate, the workers' client certificate and the job token, as the files
//! `forger_proto::tls` reads.
//!
//! One CA per cluster, trusted by nothing else: the coordinator's certificate need not come
//! from a public CA, and a worker trusts only the coordinator its own cluster's CA signed.

use std::io::Write;
use std::path::{Path, PathBuf};

use forger_proto::tls::files;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};

use crate::error::{CoordinatorError, Result};

/// Names every coordinator certificate carries besides the ones asked for: the local workers'
/// loopback addresses and the service name of the compose file and Kubernetes manifests.
pub const DEFAULT_HOSTS: &[&str] = &["localhost", "127.0.0.1", "::1", "coordinator"];
/// How long the certificates are valid, in years.
const VALID_YEARS: i32 = 10;
/// Random bytes in a job token (written as hex).
const TOKEN_BYTES: usize = 32;

/// What `generate` wrote.
#[derive(Debug)]
pub struct Written {
    pub files: Vec<PathBuf>,
    pub hosts: Vec<String>,
}

/// Every file of a credentials folder.
const ALL_FILES: [&str; 7] = [
    files::CA_CERT,
    files::CA_KEY,
    files::COORDINATOR_CERT,
    files::COORDINATOR_KEY,
    files::WORKER_CERT,
    files::WORKER_KEY,
    files::TOKEN,
];

/// Whether `dir` already holds a complete set (for `--keep`: a compose file or batch script
/// that runs the command on every start). A partial set is an error: something removed files
/// that the nodes may still hold.
pub fn complete(dir: &Path) -> Result<bool> {
    let missing: Vec<&str> = ALL_FILES.iter().copied().filter(|f| !dir.join(f).exists()).collect();
    match missing.len() {
        0 => Ok(true),
        n if n == ALL_FILES.len() => Ok(false),
        _ => Err(CoordinatorError::Refused(format!(
            "{} holds part of a credentials folder; missing {} (remove the folder to start afresh, or pass --force)",
            dir.display(),
            missing.join(", ")
        ))),
    }
}

/// Writes a fresh set of credentials into `dir` (created if missing). The coordinator's
/// certificate names `hosts` as well as [`DEFAULT_HOSTS`]. Existing files are kept unless
/// `overwrite`: replacing a cluster's CA locks out every node that has the old one.
pub fn generate(dir: &Path, hosts: &[String], overwrite: bool) -> Result<Written> {
    let existing: Vec<&str> = ALL_FILES.iter().copied().filter(|f| dir.join(f).exists()).collect();
    if !overwrite && !existing.is_empty() {
        return Err(CoordinatorError::Refused(format!(
            "{} already holds {}: pass --force to replace them (every node then needs the new ones)",
            dir.display(),
            existing.join(", ")
        )));
    }
    let mut names: Vec<String> = DEFAULT_HOSTS.iter().map(|h| h.to_string()).collect();
    for host in hosts {
        if !names.contains(host) {
            names.push(host.clone());
        }
    }
    let failed = |what: &str, e: rcgen::Error| CoordinatorError::Refused(format!("cannot make the {what}: {e}"));

    let ca_key = KeyPair::generate().map_err(|e| failed("CA key", e))?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(|e| failed("CA certificate", e))?;
    ca.distinguished_name.push(DnType::CommonName, "forger cluster CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut ca);
    let ca_cert = ca.self_signed(&ca_key).map_err(|e| failed("CA certificate", e))?;
    let issuer = Issuer::new(ca, ca_key);

    let leaf = |common_name: &str, sans: Vec<String>, usage: ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().map_err(|e| failed(common_name, e))?;
        let mut params = CertificateParams::new(sans).map_err(|e| failed(common_name, e))?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params);
        let cert = params.signed_by(&key, &issuer).map_err(|e| failed(common_name, e))?;
        Ok::<_, CoordinatorError>((cert.pem(), key.serialize_pem()))
    };
    let (coordinator_cert, coordinator_key) =
        leaf("forger coordinator", names.clone(), ExtendedKeyUsagePurpose::ServerAuth)?;
    let (worker_cert, worker_key) = leaf("forger worker", Vec::new(), ExtendedKeyUsagePurpose::ClientAuth)?;

    let mut token = [0u8; TOKEN_BYTES];
    getrandom::fill(&mut token)
        .map_err(|e| CoordinatorError::Refused(format!("no random bytes for the token: {e}")))?;
    let token: String = token.iter().map(|b| format!("{b:02x}")).collect();

    std::fs::create_dir_all(dir).map_err(|e| CoordinatorError::io(format!("failed to create {}", dir.display()), e))?;
    let mut written = Vec::new();
    // Certificates are public; keys and the token are for their owner only.
    for (name, text, secret) in [
        (files::CA_CERT, ca_cert.pem(), false),
        (files::CA_KEY, issuer.key().serialize_pem(), true),
        (files::COORDINATOR_CERT, coordinator_cert, false),
        (files::COORDINATOR_KEY, coordinator_key, true),
        (files::WORKER_CERT, worker_cert, false),
        (files::WORKER_KEY, worker_key, true),
        (files::TOKEN, format!("{token}\n"), true),
    ] {
        let path = dir.join(name);
        write_file(&path, text.as_bytes(), secret)?;
        written.push(path);
    }
    Ok(Written {
        files: written,
        hosts: names,
    })
}

fn set_validity(params: &mut CertificateParams) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // A day of slack for clocks that lag behind the machine that made the certificates.
    let year = 1970 + (now.saturating_sub(86_400) / 31_556_952) as i32;
    params.not_before = rcgen::date_time_ymd(year, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + VALID_YEARS, 1, 1);
}

fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        options.mode(if secret { 0o600 } else { 0o644 });
        // `mode` applies only to a new file; one being replaced keeps its own otherwise.
        if let Ok(meta) = std::fs::metadata(path) {
            let mut permissions = meta.permissions();
            permissions.set_mode(if secret { 0o600 } else { 0o644 });
            let _ = std::fs::set_permissions(path, permissions);
        }
    }
    let failed = |e| CoordinatorError::io(format!("failed to write {}", path.display()), e);
    let mut file = options.open(path).map_err(failed)?;
    file.write_all(bytes).map_err(failed)?;
    file.sync_all().map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use forger_proto::tls::{ClientSecurity, ServerSecurity};

    #[test]
    fn a_generated_folder_loads_on_both_sides() {
        let dir = tempfile::tempdir().unwrap();
        let written = generate(dir.path(), &["gpu-node-1".into()], false).unwrap();
        assert_eq!(written.files.len(), 7);
        assert!(written.hosts.contains(&"gpu-node-1".to_string()));
        assert!(matches!(
            ServerSecurity::load(dir.path(), true).unwrap(),
            ServerSecurity::Tls { mutual: true, .. }
        ));
        assert!(matches!(
            ClientSecurity::load(dir.path(), None).unwrap(),
            ClientSecurity::Tls(_)
        ));
        let token = std::fs::read_to_string(dir.path().join(files::TOKEN)).unwrap();
        assert_eq!(token.trim().len(), 2 * TOKEN_BYTES);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |f| std::fs::metadata(dir.path().join(f)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(files::COORDINATOR_KEY), 0o600);
            assert_eq!(mode(files::TOKEN), 0o600);
            assert_eq!(mode(files::CA_CERT), 0o644);
        }
    }

    #[test]
    fn an_existing_folder_is_kept_unless_asked() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &[], false).unwrap();
        let token = std::fs::read(dir.path().join(files::TOKEN)).unwrap();
        let refused = generate(dir.path(), &[], false).unwrap_err().to_string();
        assert!(refused.contains("--force"), "{refused}");
        assert_eq!(std::fs::read(dir.path().join(files::TOKEN)).unwrap(), token);
        generate(dir.path(), &[], true).unwrap();
        assert_ne!(std::fs::read(dir.path().join(files::TOKEN)).unwrap(), token);
    }

    #[test]
    fn a_folder_is_complete_empty_or_refused_as_partial() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!complete(dir.path()).unwrap());
        generate(dir.path(), &[], false).unwrap();
        assert!(complete(dir.path()).unwrap());
        std::fs::remove_file(dir.path().join(files::WORKER_KEY)).unwrap();
        let partial = complete(dir.path()).unwrap_err().to_string();
        assert!(partial.contains("worker.key"), "{partial}");
    }
}
