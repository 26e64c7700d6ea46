//! The length-delimited framing of the WebTransport session stream (proto/framing.rs), read the
//! way the node reads it: `Reader` below is `WtSource::recv` (transport/webtransport/stream.rs)
//! with the QUIC stream replaced by a list of chunks, the same buffer handling step for step.
//!
//! The input is frames (delimited as the client writes them) followed by arbitrary bytes, cut
//! into arbitrary chunks. What the reader yields must be exactly what an independent reference
//! parser finds in the whole byte string, whatever the cuts, and every frame must be as written.
#![no_main]

use arbitrary::Arbitrary;
use bytes::{Buf, Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use roomwire::proto::ClientFrame;
use roomwire::proto::framing::{self, Delimited};

#[derive(Arbitrary, Debug)]
struct Input {
    frames: Vec<Vec<u8>>,
    tail: Vec<u8>,
    /// Chunk lengths (0 is taken as 1), used in turn.
    cuts: Vec<u8>,
    /// The reader's limit (`session.max_frame_bytes`).
    max: u16,
    /// Chunks sliced from one buffer (shared: the reader copies them) or owned ones (taken over).
    shared: bool,
}

#[derive(Debug, PartialEq)]
enum Event {
    Frame(Bytes),
    TooBig,
    Invalid,
    /// The stream ended with this many bytes of an unfinished frame.
    Closed(usize),
}

struct Reader<I> {
    chunks: I,
    buf: BytesMut,
    max_frame: usize,
}

impl<I: Iterator<Item = Bytes>> Reader<I> {
    fn recv(&mut self) -> Event {
        loop {
            let parsed = framing::parse_delimited(&self.buf, self.max_frame);
            check(&self.buf, self.max_frame, &parsed);
            match parsed {
                Delimited::Frame { prefix, len } => {
                    self.buf.advance(prefix);
                    let frame = self.buf.split_to(len).freeze();
                    if self.buf.is_empty() {
                        self.buf = BytesMut::new();
                    }
                    return Event::Frame(frame);
                }
                Delimited::TooBig { .. } => return Event::TooBig,
                Delimited::Invalid => return Event::Invalid,
                Delimited::Incomplete { need } => {
                    if !self.buf.is_empty() {
                        self.buf.reserve(need.saturating_sub(self.buf.len()));
                    }
                }
            }
            match self.chunks.next() {
                Some(chunk) if self.buf.is_empty() => {
                    self.buf = chunk
                        .try_into_mut()
                        .unwrap_or_else(|c| BytesMut::from(&c[..]));
                }
                Some(chunk) => self.buf.extend_from_slice(&chunk),
                None => return Event::Closed(self.buf.len()),
            }
        }
    }
}

/// What `parse_delimited` answers is consistent with the buffer it was given.
fn check(buf: &[u8], max: usize, parsed: &Delimited) {
    match *parsed {
        Delimited::Frame { prefix, len } => {
            assert!((1..=10).contains(&prefix) && len <= max && prefix + len <= buf.len());
        }
        Delimited::Incomplete { need } => assert!(need > buf.len()),
        Delimited::TooBig { len } => assert!(len > max as u64),
        Delimited::Invalid => assert!(buf.len() >= 10),
    }
}

/// An independent reading of the whole stream: protobuf varint lengths, then the frames.
fn reference(mut bytes: &[u8], max: usize) -> Vec<Event> {
    let mut events = Vec::new();
    loop {
        if bytes.is_empty() {
            events.push(Event::Closed(0));
            return events;
        }
        let mut len: u128 = 0;
        let mut prefix = None;
        for (i, &b) in bytes.iter().take(10).enumerate() {
            len |= u128::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                prefix = Some(i + 1);
                break;
            }
        }
        let Some(prefix) = prefix else {
            events.push(if bytes.len() >= 10 {
                Event::Invalid
            } else {
                Event::Closed(bytes.len())
            });
            return events;
        };
        if len > u128::from(u64::MAX) {
            events.push(Event::Invalid);
            return events;
        }
        if len > max as u128 {
            events.push(Event::TooBig);
            return events;
        }
        let len = len as usize;
        if bytes.len() < prefix + len {
            events.push(Event::Closed(bytes.len()));
            return events;
        }
        events.push(Event::Frame(Bytes::copy_from_slice(
            &bytes[prefix..prefix + len],
        )));
        bytes = &bytes[prefix + len..];
    }
}

fuzz_target!(|input: Input| {
    let max = usize::from(input.max);
    let mut stream = BytesMut::new();
    for frame in &input.frames {
        framing::delimit_into(frame, &mut stream);
    }
    let delimited = stream.len();
    stream.extend_from_slice(&input.tail);
    let stream = stream.freeze();

    let mut chunks = Vec::new();
    let (mut at, mut cut) = (0, 0);
    while at < stream.len() {
        let len = usize::from(input.cuts.get(cut).copied().unwrap_or(u8::MAX).max(1));
        let end = (at + len).min(stream.len());
        chunks.push(if input.shared {
            stream.slice(at..end)
        } else {
            Bytes::copy_from_slice(&stream[at..end])
        });
        at = end;
        cut = (cut + 1) % input.cuts.len().max(1);
    }

    let mut reader = Reader {
        chunks: chunks.into_iter(),
        buf: BytesMut::new(),
        max_frame: max,
    };
    let mut events = Vec::new();
    loop {
        let event = reader.recv();
        if let Event::Frame(frame) = &event {
            // The session decodes each frame; whatever the bytes, that is an answer, not a panic.
            let _ = ClientFrame::decode_bytes(frame.clone());
            events.push(event);
        } else {
            events.push(event);
            break;
        }
    }
    assert_eq!(events, reference(&stream, max));

    // The frames written come back as written, up to the first one over the limit.
    let written = input.frames.iter().take_while(|f| f.len() <= max);
    for (event, frame) in events.iter().zip(written) {
        assert_eq!(event, &Event::Frame(Bytes::copy_from_slice(frame)));
    }
    if input.tail.is_empty() && input.frames.iter().all(|f| f.len() <= max) {
        assert_eq!(events.len(), input.frames.len() + 1);
        assert_eq!(events.last(), Some(&Event::Closed(0)), "{delimited} bytes");
    }
});
