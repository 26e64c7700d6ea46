//! One client connection's life, independent of its transport.
//!
//! Life cycle: **connecting** (the transport is up; the first frame must be `Connect` within the
//! handshake timeout, [`handshake`]) → **authenticated** (`Connected` sent; the writer task runs)
//! → **closing** (a [`CloseReason`] is set: by the peer, an error, the slow-consumer policy, an
//! operator or the drain) → **closed** (memberships dropped, close code sent, tasks ended).
//!
//! Two tasks per session: the reader ([`reader`], on the session's task) handles inbound frames;
//! the writer ([`writer`]) drains the member's bounded send queue into the transport, coalescing
//! every frame waiting in the queue into one write, and sends heartbeats. Publishes whose room is
//! owned by another node are sequenced on a third, short-lived task, one batch at a time, while
//! the reader goes on reading ([`pipeline`]). The transport is reached only through
//! [`FrameSource`] and [`FrameSink`] ([`io`]).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::auth::Principal;
use crate::context::NodeContext;
use crate::member::{CloseReason, Transport};
use crate::room::RoomName;

mod errors;
mod handshake;
mod io;
mod pipeline;
mod reader;
mod writer;

pub use io::{FrameSink, FrameSource, Inbound, TransportError};

/// Runs one session to its end on the task that polls it: handshake, then the reader loop, then
/// teardown. The writer runs on a task of its own, spawned once the session is authenticated and
/// a member of its implicit rooms.
///
/// The span is attached by hand rather than with `#[tracing::instrument]`, whose wrapper future
/// keeps a second copy of every argument for the session's whole life.
pub fn run<S: FrameSource, K: FrameSink>(
    ctx: Arc<NodeContext>,
    transport: Transport,
    peer: SocketAddr,
    authenticated: Option<Principal>,
    source: S,
    sink: K,
) -> impl Future<Output = ()> + Send {
    let span = tracing::info_span!(
        "session",
        session = tracing::field::Empty,
        user = tracing::field::Empty,
        peer = %peer,
        transport = transport.label(),
    );
    tracing::Instrument::instrument(
        serve(ctx, transport, peer, authenticated, source, sink),
        span,
    )
}

/// The session's body. A plain function returning an `async move` block rather than an
/// `async fn`: an `async fn` keeps its arguments twice in its state (as captured and as moved
/// locals), and every byte of this state is held by each idle session.
#[allow(clippy::manual_async_fn)]
fn serve<S: FrameSource, K: FrameSink>(
    ctx: Arc<NodeContext>,
    transport: Transport,
    peer: SocketAddr,
    authenticated: Option<Principal>,
    mut source: S,
    mut sink: K,
) -> impl Future<Output = ()> + Send {
    async move {
        // The handshake, the implicit joins, each request and the teardown are boxed: they run
        // briefly, and inline they would make every idle session's task as large as the largest
        // of them (the mesh's join and publish futures are kilobytes).
        let handshake =
            handshake::handshake(&ctx, transport, peer, authenticated, &mut source, &mut sink);
        let Some((mut session, mut connecting)) = Box::pin(handshake).await else {
            Box::pin(handshake::linger(&mut source)).await;
            return;
        };
        let handle = session.handle.clone();
        tracing::Span::current()
            .record("session", &*handle.id)
            .record("user", &*handle.user);
        tracing::debug!(client = %handle.client_name, "session authenticated");
        let metrics = &ctx.metrics;
        metrics
            .sessions
            .get_or_create(&[("transport", transport.label())])
            .inc();
        metrics
            .sessions_opened
            .get_or_create(&[("transport", transport.label())])
            .inc();

        let implicit = [RoomName::for_user(&handle.user), RoomName::broadcast()];
        // A user room with a position to resume from is rejoined once the writer runs (its
        // replay waits on it); its messages meanwhile are part of that replay.
        session.user_room_since = Box::pin(session.user_room_position()).await;
        let live = if session.user_room_since.is_some() {
            &implicit[1..]
        } else {
            &implicit[..]
        };
        for room in live {
            // Membership of the user's and the broadcast room; no Joined frame is sent for them.
            // A session that could not become a member would silently miss what is sent to its
            // user: it is told to reconnect (elsewhere) instead.
            if let Err(error) = Box::pin(ctx.bus.join(room, &handle, None, None)).await {
                tracing::warn!(%error, %room, "implicit join failed; sending the session away");
                connecting.fail(&error);
                handle.go_away("this node cannot serve the session now; reconnect");
                break;
            }
        }
        // A drain that started after this session was authenticated but before it joined
        // $broadcast did not see it; tell it now (the drain cancels before it takes its snapshot).
        if ctx.shutdown.is_cancelled() {
            handle.go_away("node shutting down");
        }
        // Only now is the queued `Connected` written, so a client that has it is a member of its
        // implicit rooms and a message to its user published right after reaches it. (In a mesh
        // the owner of the user's room hands messages to its own members directly, never through
        // NATS: a publish there in that moment found no member here and was lost to the session.)
        // What was delivered meanwhile waits in the bounded queue behind `Connected`.
        let writer = tokio::spawn(writer::write_loop(ctx.clone(), handle.clone(), sink));
        drop(connecting);
        // The rooms a reconnecting client resumes are rejoined (their missed messages replayed)
        // before any other request is read; the replay waits on the writer, which runs now.
        Box::pin(session.resume()).await;
        session.read_loop(&mut source).await;
        session.publishes.detach(&ctx);

        // Teardown: no new pushes once memberships are gone; then let the writer finish.
        for room in session.rooms.iter().chain(&implicit) {
            Box::pin(ctx.bus.leave(room, &handle)).await;
        }
        handle.close(CloseReason::ClientClosed);
        let _ = writer.await;
        Box::pin(handshake::linger(&mut source)).await;
        handle.set_closed();
        let reason = handle.reason();
        metrics
            .sessions
            .get_or_create(&[("transport", transport.label())])
            .dec();
        if reason.peer_caused() {
            tracing::debug!(reason = reason.label(), "session closed");
        } else {
            tracing::info!(reason = reason.label(), "session closed");
        }
    }
}
