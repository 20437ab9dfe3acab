//! A real leash server for integration tests: bound on 127.0.0.1:0 (and a
//! Unix socket in a temp dir when asked), called through the generated client.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use leash::bundle::Snapshot;
use leash::proto::v1 as pb;
use leash::proto::v1::authorizer_client::AuthorizerClient;
use leash::server::{bind_tcp, bind_uds, Server, ServerOptions};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub fn example_snapshot() -> Snapshot {
    Snapshot::load_dirs(&repo_path("policies"), &repo_path("schemas"))
        .expect("example bundle loads")
}

pub fn plain_snapshot() -> Snapshot {
    Snapshot::load_dirs(
        &repo_path("tests/fixtures/plain/policies"),
        &repo_path("tests/fixtures/plain/schemas"),
    )
    .expect("plain bundle loads")
}

pub struct TestServer {
    pub server: Arc<Server>,
    pub addr: SocketAddr,
    pub uds: Option<PathBuf>,
    pub client: AuthorizerClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), leash::server::ServeError>>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    /// The example bundle over TCP.
    pub async fn example() -> Self {
        Self::start(Some(example_snapshot()), ServerOptions::default(), false).await
    }

    pub async fn plain() -> Self {
        Self::start(Some(plain_snapshot()), ServerOptions::default(), false).await
    }

    /// Starts serving; publishes `snapshot` if given (else health stays
    /// NOT_SERVING until the test publishes one).
    pub async fn start(snapshot: Option<Snapshot>, options: ServerOptions, with_uds: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let tcp = bind_tcp("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind tcp");
        let addr = match &tcp {
            leash::server::Listener::Tcp(l) => l.local_addr().expect("local addr"),
            leash::server::Listener::Unix(..) => unreachable!(),
        };
        let mut listeners = vec![tcp];
        let uds = if with_uds {
            let path = dir.path().join("leash.sock");
            listeners.push(bind_uds(&path).expect("bind uds"));
            Some(path)
        } else {
            None
        };
        let server = Arc::new(Server::new(options).await);
        if let Some(snapshot) = snapshot {
            server.publish(snapshot).await;
        }
        let (stop, stopped) = oneshot::channel::<()>();
        let running = server.clone();
        let task = tokio::spawn(async move {
            running
                .run(listeners, async {
                    let _ = stopped.await;
                })
                .await
        });
        let client = leash::check::connect_tcp(&addr.to_string())
            .await
            .expect("connect");
        Self {
            server,
            addr,
            uds,
            client,
            stop: Some(stop),
            task: Some(task),
            _dir: dir,
        }
    }

    /// Stops the server the way SIGTERM does and waits for it to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("server task")
                .expect("server ran cleanly");
        }
    }

    pub async fn decide(
        &self,
        req: pb::IsAuthorizedRequest,
    ) -> Result<pb::IsAuthorizedResponse, tonic::Status> {
        self.client
            .clone()
            .is_authorized(req)
            .await
            .map(tonic::Response::into_inner)
    }
}

/// `Type::"id"` → wire entity reference.
pub fn uid(s: &str) -> pb::EntityUid {
    let (ty, id) = s.split_once("::\"").expect("Type::\"id\"");
    pb::EntityUid {
        r#type: ty.to_owned(),
        id: id.trim_end_matches('"').to_owned(),
    }
}

pub fn request(
    agent: &str,
    user: Option<&str>,
    action: &str,
    resource: &str,
) -> pb::IsAuthorizedRequest {
    pb::IsAuthorizedRequest {
        request_id: String::new(),
        principal: Some(pb::Principal {
            agent: Some(uid(agent)),
            on_behalf_of: user.map(uid),
        }),
        action: Some(uid(action)),
        resource: Some(uid(resource)),
        context_input: None,
        entities_input: None,
    }
}

pub fn with_context_json(mut req: pb::IsAuthorizedRequest, json: &str) -> pb::IsAuthorizedRequest {
    req.context_input = Some(pb::is_authorized_request::ContextInput::ContextJson(
        json.to_owned(),
    ));
    req
}

pub fn with_entities_json(mut req: pb::IsAuthorizedRequest, json: &str) -> pb::IsAuthorizedRequest {
    req.entities_input = Some(pb::is_authorized_request::EntitiesInput::EntitiesJson(
        json.to_owned(),
    ));
    req
}

pub const ALLOW: i32 = pb::Decision::Allow as i32;
pub const DENY: i32 = pb::Decision::Deny as i32;

pub fn name(decision: i32) -> &'static str {
    match decision {
        ALLOW => "ALLOW",
        DENY => "DENY",
        _ => "UNSPECIFIED",
    }
}
