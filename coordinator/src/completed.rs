//! A coordinator started on a run that is already complete (its checkpoint reaches
//! `train.steps`) has nothing to train, but workers may already be dialing it: a supervisor
//! that starts the whole cluster again (`docker compose up`, a resubmitted Slurm job) starts
//! them too. Exiting at once would leave them dialing an address that never answers until
//! their patience runs out, and a supervisor restarting them after that for ever. So for a
//! while the coordinator answers every call with `OUT_OF_RANGE`, which workers take as "the
//! run is over" and leave with success.

use std::time::Duration;

use forger_proto::pb;
use forger_proto::tls::ServerSecurity;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};
use tracing::info;

use crate::service::BoxStream;

#[derive(Debug, Clone)]
struct CompletedRun {
    message: String,
}

impl CompletedRun {
    fn refuse<T>(&self) -> Result<T, Status> {
        Err(Status::out_of_range(self.message.clone()))
    }
}

#[tonic::async_trait]
impl pb::coordinator_server::Coordinator for CompletedRun {
    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinReply>, Status> {
        info!(host = %request.get_ref().host, "a worker asked to join the complete run: told it is over");
        self.refuse()
    }

    type FetchShardStream = BoxStream<pb::ShardChunk>;

    async fn fetch_shard(&self, _: Request<pb::ShardRequest>) -> Result<Response<Self::FetchShardStream>, Status> {
        self.refuse()
    }

    type SessionStream = BoxStream<pb::CoordinatorMessage>;

    async fn session(&self, _: Request<Streaming<pb::WorkerMessage>>) -> Result<Response<Self::SessionStream>, Status> {
        self.refuse()
    }
}

/// Tells every worker that calls within `linger` that the run ended at `step`, then returns;
/// `shutdown` cuts it short.
pub async fn answer_workers(
    listener: TcpListener,
    security: ServerSecurity,
    step: u64,
    linger: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let service = CompletedRun {
        message: format!("the run is complete: its checkpoint reaches step {step}, its train.steps"),
    };
    info!(seconds = linger.as_secs(), "answering workers that the run is complete");
    let server = tonic::transport::Server::builder()
        // Only to those with the job's credentials: even "the run is over" is not for strangers.
        .add_service(pb::coordinator_server::CoordinatorServer::with_interceptor(
            service,
            security.require_token(),
        ))
        .serve_with_incoming_shutdown(crate::listener::route(listener, None, security), async {
            tokio::select! {
                _ = tokio::time::sleep(linger) => {},
                _ = shutdown => {},
            }
        });
    if let Err(e) = server.await {
        tracing::warn!(error = %e, "the server answering workers failed");
    }
}
