//! The coordinator's address as each side sees it: the port it listens on, the ports that
//! forward to it (a Kubernetes Service, a compose service name), and the URL workers dial.
//! Each is written in a different place, so nothing but a check keeps them equal.

use crate::manifest_check::{Container, Location, Problem, join};

/// The port the coordinator listens on (when it can be read), which must be reachable from
/// other hosts and be a port the container declares (when it declares any). The port comes
/// back with the problems so the endpoints can still be held to it.
pub fn check_listen(coordinator: &Container) -> (Option<u16>, Vec<Problem>) {
    let unread = |at: Location, message: String| (None, vec![Problem::new(at, message)]);
    let Some(listen) = coordinator.setting("--listen", "FORGER_LISTEN") else {
        return unread(
            coordinator.env_at("FORGER_LISTEN"),
            "not set: the coordinator would listen on its default 127.0.0.1:50051, which no other host can reach"
                .into(),
        );
    };
    let Some((host, port)) = listen.value.rsplit_once(':') else {
        return unread(listen.at, format!("`{}` is not HOST:PORT", listen.value));
    };
    let Ok(port) = port.parse::<u16>() else {
        return unread(listen.at, format!("`{}` has no valid port", listen.value));
    };
    let mut problems = Vec::new();
    if let Some(status) = coordinator.setting("--status-addr", "FORGER_STATUS_ADDR")
        && status.value.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()) == Some(port)
    {
        problems.push(Problem::new(
            status.at,
            format!(
                "`{}` puts the status page on port {port}, where the coordinator listens for workers ({})",
                status.value, listen.at.field
            ),
        ));
    }
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host == "localhost" || host == "::1" || host.starts_with("127.") {
        problems.push(Problem::new(
            listen.at.clone(),
            format!(
                "`{}` is a loopback address: workers on other hosts cannot reach it",
                listen.value
            ),
        ));
    }
    if !coordinator.ports.is_empty() && !coordinator.ports.iter().any(|p| p.number == port) {
        problems.push(Problem::new(
            coordinator.at.child("ports"),
            format!(
                "the coordinator listens on port {port} ({}) but the container declares {}",
                listen.at.field,
                join(coordinator.ports.iter().map(|p| p.number.to_string()))
            ),
        ));
    }
    (Some(port), problems)
}

/// How a name workers dial reaches the coordinator: a Kubernetes Service port, or a compose
/// service name on the coordinator's own port.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub at: Location,
    /// The host name workers put in their coordinator URL.
    pub host: String,
    /// The port workers dial.
    pub port: u16,
    /// The coordinator container's port it forwards to.
    pub target: TargetPort,
}

/// A Service's `targetPort`: a number, or the name of one of the container's ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

/// The endpoints must forward to the port the coordinator listens on, and every worker's
/// coordinator URL must be `http://HOST:PORT` naming one of them.
pub fn check_endpoints(
    coordinator: &Container,
    listen_port: u16,
    endpoints: &[Endpoint],
    workers: &[Container],
) -> Vec<Problem> {
    let mut problems = Vec::new();
    for endpoint in endpoints {
        let target = match &endpoint.target {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Name(name) => coordinator
                .ports
                .iter()
                .find(|p| p.name.as_deref() == Some(name))
                .map(|p| p.number),
        };
        match target {
            None => problems.push(Problem::new(
                endpoint.at.clone(),
                format!(
                    "forwards to {:?}, which is no port of the coordinator container ({})",
                    endpoint.target, coordinator.at
                ),
            )),
            Some(target) if target != listen_port => problems.push(Problem::new(
                endpoint.at.clone(),
                format!("forwards to port {target}, but the coordinator listens on {listen_port}"),
            )),
            Some(_) => {}
        }
    }
    for worker in workers {
        let Some(url) = worker.setting("--coordinator", "FORGER_COORDINATOR") else {
            problems.push(Problem::new(
                worker.env_at("FORGER_COORDINATOR"),
                "not set: the worker has no coordinator to dial",
            ));
            continue;
        };
        // TLS or not is the worker's --credentials or --insecure, whichever scheme it dials.
        let Some(address) = url
            .value
            .strip_prefix("http://")
            .or_else(|| url.value.strip_prefix("https://"))
        else {
            problems.push(Problem::new(
                url.at,
                format!("`{}` must start with http:// or https://", url.value),
            ));
            continue;
        };
        let address = address.trim_end_matches('/');
        let Some((host, port)) = address
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
        else {
            problems.push(Problem::new(
                url.at,
                format!("`{}` names no port (http://HOST:PORT)", url.value),
            ));
            continue;
        };
        // A Service is also reachable by its longer names (forger-coordinator.ns.svc...).
        let serving: Vec<&Endpoint> = endpoints
            .iter()
            .filter(|e| host == e.host || host.strip_prefix(e.host.as_str()).is_some_and(|r| r.starts_with('.')))
            .collect();
        if serving.is_empty() {
            problems.push(Problem::new(
                url.at,
                format!(
                    "`{}` dials host {host}, but the coordinator is reached as {}",
                    url.value,
                    join(endpoints.iter().map(|e| format!("{} ({})", e.host, e.at.object)))
                ),
            ));
        } else if !serving.iter().any(|e| e.port == port) {
            problems.push(Problem::new(
                url.at,
                format!(
                    "`{}` dials port {port}, but {} serves port {}",
                    url.value,
                    serving[0].at.object,
                    join(serving.iter().map(|e| e.port.to_string()))
                ),
            ));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest_check::Binary;

    fn coordinator(env: &[(&str, &str)]) -> Container {
        let mut c = Container::new(
            Location::new("f.yaml", "StatefulSet/c", "containers[c]"),
            Binary::Coordinator,
        );
        c.env = env.iter().map(|(k, v)| (k.to_string(), Some(v.to_string()))).collect();
        c
    }

    #[test]
    fn a_loopback_or_missing_listen_address_is_refused() {
        let (port, problems) = check_listen(&coordinator(&[("FORGER_LISTEN", "0.0.0.0:7")]));
        assert_eq!((port, problems), (Some(7), vec![]));
        let (port, problems) = check_listen(&coordinator(&[("FORGER_LISTEN", "127.0.0.1:7")]));
        assert_eq!(port, Some(7));
        assert!(problems[0].message.contains("loopback"), "{}", problems[0]);
        let (port, problems) = check_listen(&coordinator(&[]));
        assert_eq!(port, None);
        assert!(problems[0].message.contains("default"), "{}", problems[0]);
    }

    #[test]
    fn a_worker_may_dial_either_scheme_but_no_other() {
        let coordinator = coordinator(&[("FORGER_LISTEN", "0.0.0.0:7")]);
        let endpoint = Endpoint {
            at: Location::new("s.yaml", "Service/c", "spec.ports[0].targetPort"),
            host: "c".into(),
            port: 7,
            target: TargetPort::Number(7),
        };
        let worker = |url: &str| {
            let mut w = Container::new(Location::new("w.yaml", "Job/w", "containers[w]"), Binary::Worker);
            w.env.insert("FORGER_COORDINATOR".into(), Some(url.into()));
            w
        };
        let problems = |url: &str| check_endpoints(&coordinator, 7, std::slice::from_ref(&endpoint), &[worker(url)]);
        assert_eq!(problems("http://c:7"), []);
        assert_eq!(problems("https://c:7"), []);
        let found = problems("grpc://c:7");
        assert!(
            found[0].message.contains("must start with http:// or https://"),
            "{}",
            found[0]
        );
    }
}
