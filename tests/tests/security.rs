//! TLS, mutual TLS and the job token, on real sockets: a client without the credentials gets
//! `Unauthenticated` (or no connection at all) and nothing else, and a cluster with them trains.
//! The credentials come from the real helper command, `forger-coordinator credentials`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use forger_proto::pb::{self, coordinator_client::CoordinatorClient};
use forger_proto::tls::{ClientSecurity, files};
use forger_proto::token::{AddToken, JobToken};
use forger_tests::fake_worker::{FakeWorker, open_data_connection, open_data_connection_secured};
use forger_tests::processes::{Process, free_local_address};
use forger_tests::{TestCoordinator, binary, tiny_data_folder, tiny_spec};

/// A new cluster's credentials in `dir/name`, made by the helper command.
fn make_credentials(dir: &Path, name: &str) -> PathBuf {
    let out = dir.join(name);
    let made = Command::new(binary("forger-coordinator"))
        .args(["credentials", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    out
}

/// A folder holding `from`'s files, some replaced by `other`'s and some left out.
fn mixed_folder(dir: &Path, name: &str, from: &Path, replace: &[(&str, &Path)], leave_out: &[&str]) -> PathBuf {
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    for file in [files::CA_CERT, files::WORKER_CERT, files::WORKER_KEY, files::TOKEN] {
        if leave_out.contains(&file) {
            continue;
        }
        let source = replace
            .iter()
            .find(|(f, _)| *f == file)
            .map_or(from.to_path_buf(), |(_, other)| other.to_path_buf());
        std::fs::copy(source.join(file), out.join(file)).unwrap();
    }
    out
}

fn address(coordinator: &TestCoordinator) -> String {
    coordinator.address.to_string()
}

/// A Join with this build's protocol version.
fn join_request() -> pb::JoinRequest {
    pb::JoinRequest {
        protocol_version: forger_proto::PROTOCOL_VERSION,
        host: "stranger".into(),
        device: "none".into(),
        threads: 1,
        replicas: 1,
        forger_version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// Every RPC of a client over TLS that carries `token`, which must all be refused as
/// Unauthenticated with a message containing `says`.
async fn all_calls_unauthenticated(address: &str, security: &ClientSecurity, token: AddToken, says: &str) {
    let channel = security
        .endpoint(address)
        .unwrap()
        .connect()
        .await
        .expect("TLS itself works");
    let mut client = CoordinatorClient::with_interceptor(channel, token);
    let status = client.join(join_request()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
    assert!(status.message().contains(says), "{status}");
    let status = client
        .fetch_shard(pb::ShardRequest { worker_id: 1, shard: 0 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
    let status = client
        .session(tokio_stream::iter(Vec::<pb::WorkerMessage>::new()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_job_token_a_client_gets_unauthenticated_and_nothing_else() {
    let (dir, data) = tiny_data_folder();
    let credentials = make_credentials(dir.path(), "cluster");
    let spec = tiny_spec(&data, 1, 1);
    let coordinator =
        TestCoordinator::start_secured(spec, &dir.path().join("run"), false, None, Some(&credentials), false).await;
    let address = address(&coordinator);
    let tls = ClientSecurity::load(&credentials, None).unwrap();

    all_calls_unauthenticated(&address, &tls, AddToken(None), "no job token").await;
    let wrong = AddToken(Some(JobToken::new("not-the-token-of-this-job").unwrap()));
    all_calls_unauthenticated(&address, &tls, wrong, "wrong").await;

    // Plain text to a TLS port gets no gRPC answer and no data connection.
    let plain = ClientSecurity::Insecure.endpoint(&address).unwrap();
    let refused = match plain.connect().await {
        Ok(channel) => CoordinatorClient::new(channel).join(join_request()).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a plain-text Join on the TLS port was answered");
    let url = format!("http://{address}");
    let data_refused = open_data_connection(&url, 1, b"whatever").await.unwrap_err();
    assert!(!data_refused.is_empty());

    // With the credentials the same port lets a worker in: it is given its shard.
    let mut worker = FakeWorker::join_secured(&url, &tls, 1).await;
    assert_eq!(worker.take_assignment().await, vec![0]);
    // ...and a data connection over TLS with a made-up session token is still refused.
    let refusal = open_data_connection_secured(&url, &tls, worker.id, &[0u8; 32])
        .await
        .unwrap_err();
    assert!(refusal.contains("refused"), "{refusal}");
    drop(coordinator);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_lets_in_only_the_cluster_s_own_worker_certificate() {
    let (dir, data) = tiny_data_folder();
    let ours = make_credentials(dir.path(), "ours");
    let theirs = make_credentials(dir.path(), "theirs");
    let spec = tiny_spec(&data, 1, 1);
    let coordinator =
        TestCoordinator::start_secured(spec, &dir.path().join("run"), false, None, Some(&ours), true).await;
    let address = address(&coordinator);

    let no_certificate = mixed_folder(
        dir.path(),
        "no-cert",
        &ours,
        &[],
        &[files::WORKER_CERT, files::WORKER_KEY],
    );
    let other_certificate = mixed_folder(
        dir.path(),
        "other-cert",
        &ours,
        &[(files::WORKER_CERT, &theirs), (files::WORKER_KEY, &theirs)],
        &[],
    );
    for folder in [&no_certificate, &other_certificate] {
        let security = ClientSecurity::load(folder, None).unwrap();
        let answered = match security.endpoint(&address).unwrap().connect().await {
            Ok(channel) => CoordinatorClient::with_interceptor(channel, security.add_token())
                .join(join_request())
                .await
                .is_ok(),
            Err(_) => false,
        };
        assert!(
            !answered,
            "{} got an answer from a mutual-TLS coordinator",
            folder.display()
        );
    }
    // Another cluster's CA does not vouch for this coordinator: the worker refuses it.
    let other_ca = mixed_folder(dir.path(), "other-ca", &ours, &[(files::CA_CERT, &theirs)], &[]);
    let security = ClientSecurity::load(&other_ca, None).unwrap();
    assert!(security.endpoint(&address).unwrap().connect().await.is_err());

    let security = ClientSecurity::load(&ours, None).unwrap();
    let mut worker = FakeWorker::join_secured(&format!("http://{address}"), &security, 1).await;
    assert_eq!(worker.take_assignment().await, vec![0]);
    drop(coordinator);
}

#[test]
fn real_processes_train_over_mutual_tls_and_a_worker_without_credentials_is_told_what_to_pass() {
    let (dir, data) = tiny_data_folder();
    let credentials = make_credentials(dir.path(), "cluster");
    let spec = dir.path().join("job.toml");
    std::fs::write(&spec, tiny_spec(&data, 2, 4).to_toml()).unwrap();
    let run = dir.path().join("run");
    let listen = free_local_address();
    let url = format!("http://{listen}");
    let mut coordinator = Process::coordinator_with(
        "coordinator",
        &spec,
        &run,
        &listen,
        false,
        dir.path(),
        None,
        Some(&credentials),
        true,
    );

    // Neither flag: a usage error before anything is dialled.
    let out = Command::new(binary("forger-worker"))
        .args(["--coordinator", &url, "--device", "cpu"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--credentials DIR"));
    // --insecure against a TLS coordinator: it cannot get in, and says what to try.
    let out = Command::new(binary("forger-worker"))
        .args([
            "--coordinator",
            &url,
            "--device",
            "cpu",
            "--insecure",
            "--patience-secs",
            "2",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--credentials"), "{stderr}");

    let devices = ["--threads", "1", "--device", "cpu"];
    let mut workers: Vec<Process> = (0..2)
        .map(|i| {
            Process::worker_with(
                &format!("worker-{i}"),
                &url,
                dir.path(),
                None,
                &devices,
                Some(&credentials),
            )
        })
        .collect();
    let status = coordinator.wait(Duration::from_secs(120));
    let log = coordinator.log_text();
    assert!(status.success(), "{log}");
    assert!(run.join("checkpoints/step-00000004.safetensors").is_file(), "{log}");
    assert!(
        log.contains("opened a TLS handshake") || log.contains("TLS handshake failed"),
        "the insecure worker's attempt is in the log: {log}"
    );
    for worker in &mut workers {
        let status = worker.wait(Duration::from_secs(60));
        assert!(status.success(), "{}", worker.log_text());
    }
}

/// An `--insecure` coordinator process on a one-step tiny spec for `data`, writing into `dir`;
/// returns it with the address it listens on.
fn insecure_coordinator(dir: &Path, data: &Path) -> (Process, String) {
    let spec = dir.join("job.toml");
    std::fs::write(&spec, tiny_spec(data, 1, 1).to_toml()).unwrap();
    let listen = free_local_address();
    let coordinator = Process::coordinator("coordinator", &spec, &dir.join("run"), &listen, false, dir, None);
    (coordinator, listen)
}

#[test]
fn a_tls_worker_against_an_insecure_coordinator_is_named_in_its_log() {
    let (dir, data) = tiny_data_folder();
    let credentials = make_credentials(dir.path(), "cluster");
    let (mut coordinator, listen) = insecure_coordinator(dir.path(), &data);
    let out = Command::new(binary("forger-worker"))
        .args([
            "--coordinator",
            &format!("http://{listen}"),
            "--device",
            "cpu",
            "--patience-secs",
            "2",
        ])
        .arg("--credentials")
        .arg(&credentials)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--insecure"), "{stderr}");
    coordinator.kill();
    let log = coordinator.log_text();
    assert!(log.contains("WARNING: --insecure"), "{log}");
    assert!(log.contains("this coordinator runs --insecure"), "{log}");
}

/// Connections that are opened and then say nothing hold their places; past the cap new ones
/// are closed at once, so a flood cannot use up the coordinator's file descriptors (and with
/// them its next checkpoint).
#[test]
fn connections_beyond_the_cap_are_closed_at_once() {
    use std::io::Read;
    let (dir, data) = tiny_data_folder();
    let (_coordinator, listen) = insecure_coordinator(dir.path(), &data);
    let connect = || loop {
        if let Ok(stream) = std::net::TcpStream::connect(&listen) {
            return stream;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let cap = 512; // coordinator::listener::MAX_CONNECTIONS
    let mut held: Vec<std::net::TcpStream> = (0..cap).map(|_| connect()).collect();
    // Give the coordinator a moment to accept them all.
    std::thread::sleep(Duration::from_millis(500));
    let mut extra = connect();
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(
        extra.read(&mut byte).unwrap(),
        0,
        "a connection past the cap is closed at once"
    );
    // One of the held ones is still open: no answer, no close, within a second.
    held[0].set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let still_open = matches!(held[0].read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut);
    assert!(still_open, "a connection within the cap is left to introduce itself");
    held.clear();
}
