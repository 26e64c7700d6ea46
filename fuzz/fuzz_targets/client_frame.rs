//! The client frame decoder: what the node does with every WebSocket message and every
//! WebTransport stream frame or datagram (`ClientFrame::decode_bytes` in session/handshake.rs and
//! session/reader.rs), then the first checks a session applies to the fields it read.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use roomwire::RoomName;
use roomwire::fuzzing::is_valid_device_id;
use roomwire::proto::ClientFrame;
use roomwire::proto::client_frame::Kind;

fuzz_target!(|data: &[u8]| {
    let Ok(frame) = ClientFrame::decode_bytes(Bytes::copy_from_slice(data)) else {
        return;
    };
    let _ = frame.kind_name();
    // What was decoded encodes and decodes to itself (unknown fields were dropped on the way in).
    let encoded = frame.encode_bytes();
    let again = ClientFrame::decode_bytes(encoded.clone()).expect("an encoded frame decodes");
    assert_eq!(again, frame);
    assert_eq!(again.encode_bytes(), encoded, "encoding is deterministic");
    let room = match &frame.kind {
        Some(Kind::Connect(connect)) => {
            let _ = is_valid_device_id(&connect.device_id);
            for position in connect.resume.iter().flat_map(|r| &r.rooms) {
                let _ = RoomName::parse_client(&position.room, 128);
            }
            return;
        }
        Some(Kind::Join(join)) => &join.room,
        Some(Kind::Leave(leave)) => &leave.room,
        Some(Kind::Publish(publish)) => &publish.room,
        Some(Kind::History(history)) => &history.room,
        Some(Kind::Seen(position)) => &position.room,
        Some(Kind::Presence(presence)) => &presence.room,
        Some(Kind::PresenceStats(stats)) => &stats.room,
        Some(Kind::Ping(_) | Kind::Refresh(_)) | None => return,
    };
    if let Ok(name) = RoomName::parse_client(room, 128) {
        assert_eq!(name.as_str(), room);
    }
});
