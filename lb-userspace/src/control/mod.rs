//! The control socket: its protocol ([`proto`], with the [`status`] it answers), the
//! controller's side ([`server`]) and the CLI's ([`client`]). The server depends on the protocol and the data plane's trace buffer; the
//! client on the protocol only.

pub mod client;
pub mod proto;
pub mod server;
pub mod status;

pub use self::{
    client::{call, connect, socket_path},
    proto::{DEFAULT_SOCKET, FlowAnswer, MAX_REQUEST_LINE, Pong, Request, Response, TraceLine, TraceStart, read_only_path},
    server::{Access, Call, Sockets, serve},
};
