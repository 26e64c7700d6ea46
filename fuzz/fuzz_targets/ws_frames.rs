//! The WebSocket side of the client frame decoder: raw bytes from a client after the upgrade, read
//! by tungstenite in the server role with the limits the node sets (`ws_config` in
//! transport/ws.rs, from the default `session` config), each binary message decoded as a
//! `ClientFrame` as the session does. The node's tokio-tungstenite wraps this same reader.
#![no_main]

use std::io::{self, Read, Write};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use roomwire::Config;
use roomwire::proto::ClientFrame;
use tungstenite::Message;
use tungstenite::protocol::{Role, WebSocket, WebSocketConfig};

/// The client's bytes, handed out `step` at a time (network reads); what the node writes back
/// (pongs, the close reply) is discarded.
struct Wire {
    input: Bytes,
    step: usize,
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.step.min(buf.len()).min(self.input.len());
        buf[..n].copy_from_slice(&self.input.split_to(n));
        Ok(n)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&step, input)) = data.split_first() else {
        return;
    };
    let s = Config::default().session;
    // As ws_config(): small eager read buffer, frame and message capped at max_frame_bytes.
    let config = WebSocketConfig::default()
        .read_buffer_size(s.ws_read_buffer_bytes)
        .write_buffer_size(s.ws_write_buffer_bytes)
        .max_write_buffer_size(s.ws_write_buffer_bytes + s.send_queue_bytes + s.max_frame_bytes)
        .max_message_size(Some(s.max_frame_bytes))
        .max_frame_size(Some(s.max_frame_bytes));
    let wire = Wire {
        input: Bytes::copy_from_slice(input),
        step: usize::from(step).max(1) * 16,
    };
    let mut ws = WebSocket::from_raw_socket(wire, Role::Server, Some(config));
    // Bounded: a closed connection may keep answering without consuming input.
    for _ in 0..10_000 {
        match ws.read() {
            Ok(Message::Binary(bytes)) => {
                assert!(bytes.len() <= s.max_frame_bytes, "over the message limit");
                let _ = ClientFrame::decode_bytes(bytes);
            }
            Ok(_) => {}
            // The session maps each error to a close code (transport/ws.rs, map_error).
            Err(_) => return,
        }
    }
});
