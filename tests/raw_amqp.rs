//! A publisher that writes AMQP 0-9-1 frames itself, for requests no AMQP client library would send: short strings that are not UTF-8, headers nested as deep as a frame holds, a content header over the client's frame size.
//!
//! lapin, like most clients, only sends UTF-8 short strings and headers it
//! built from values; RabbitMQ takes any bytes. This is the least of the protocol that publishes one message
//! with publisher confirms as `guest` on the default virtual host: the
//! handshake, a channel, `confirm.select`, `basic.publish` with a content
//! header carrying raw property bytes, the confirm, and a clean close.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_END: u8 = 0xCE;

/// A request's properties, as bytes on the wire.
pub struct RawProperties<'a> {
    /// `content-type`.
    pub content_type: &'a [u8],
    /// `correlation-id`.
    pub correlation_id: &'a [u8],
    /// `reply-to`.
    pub reply_to: &'a [u8],
    /// `message-id`.
    pub message_id: &'a [u8],
    /// `headers`, as a field table on the wire (its length first), if any.
    pub headers: Option<&'a [u8]>,
}

/// The largest frame payload an AMQP client reads: the `frame_max` both
/// sides agreed on (RabbitMQ's default, 128 KiB in 3.x and 4.x), less a
/// frame's 8 bytes around its payload.
pub const MAX_FRAME_PAYLOAD: usize = 131_072 - 8;

/// The largest frame payload RabbitMQ takes from a publisher: 8 bytes more
/// than [`MAX_FRAME_PAYLOAD`] (`rabbit_reader` allows a frame that much
/// over `frame_max`), passed on to consumers as it is.
pub const BROKER_MAX_FRAME_PAYLOAD: usize = MAX_FRAME_PAYLOAD + 8;

/// A field table of exactly `len` bytes on the wire (its length first):
/// `{"x": "..."}`, a long string padding it out.
pub fn padding_headers(len: usize) -> Vec<u8> {
    let pad = len.checked_sub(11).expect("a table of at least 11 bytes");
    let mut table = Vec::with_capacity(len);
    table.extend_from_slice(&u32::try_from(len - 4).unwrap().to_be_bytes());
    short(&mut table, b"x");
    table.push(b'S');
    long(&mut table, &vec![b'.'; pad]);
    table
}

/// The content header of a message of `body_len` bytes with `properties`.
pub fn content_header(body_len: usize, properties: &RawProperties<'_>) -> Vec<u8> {
    let mut header = Vec::new();
    header.extend_from_slice(&60u16.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&(body_len as u64).to_be_bytes());
    // content-type, headers, correlation-id, reply-to, message-id
    let mut flags: u16 = (1 << 15) | (1 << 10) | (1 << 9) | (1 << 7);
    if properties.headers.is_some() {
        flags |= 1 << 13;
    }
    header.extend_from_slice(&flags.to_be_bytes());
    short(&mut header, properties.content_type);
    if let Some(headers) = properties.headers {
        header.extend_from_slice(headers);
    }
    short(&mut header, properties.correlation_id);
    short(&mut header, properties.reply_to);
    short(&mut header, properties.message_id);
    header
}

/// A field table `{"x": [[[...]]]}`: arrays nested `depth` deep, 5 bytes
/// a level.
pub fn nested_headers(depth: usize) -> Vec<u8> {
    let mut value: Vec<u8> = Vec::new();
    for _ in 0..depth {
        let mut outer = Vec::with_capacity(value.len() + 5);
        outer.push(b'A');
        outer.extend_from_slice(&u32::try_from(value.len()).unwrap().to_be_bytes());
        outer.extend_from_slice(&value);
        value = outer;
    }
    let mut table = Vec::with_capacity(value.len() + 6);
    table.extend_from_slice(&u32::try_from(value.len() + 2).unwrap().to_be_bytes());
    short(&mut table, b"x");
    table.extend_from_slice(&value);
    table
}

fn short(out: &mut Vec<u8>, s: &[u8]) {
    out.push(u8::try_from(s.len()).expect("a short string"));
    out.extend_from_slice(s);
}

fn long(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&u32::try_from(s.len()).unwrap().to_be_bytes());
    out.extend_from_slice(s);
}

fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(4 + args.len());
    p.extend_from_slice(&class.to_be_bytes());
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(args);
    p
}

async fn send(stream: &mut TcpStream, kind: u8, channel: u16, payload: &[u8]) {
    let mut frame = Vec::with_capacity(8 + payload.len());
    frame.push(kind);
    frame.extend_from_slice(&channel.to_be_bytes());
    frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(payload);
    frame.push(FRAME_END);
    stream.write_all(&frame).await.expect("write a frame");
}

/// Reads frames until a method frame of `(class, id)`; its arguments.
async fn expect(stream: &mut TcpStream, class: u16, id: u16) -> Vec<u8> {
    loop {
        let mut head = [0u8; 7];
        stream.read_exact(&mut head).await.expect("read a frame");
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        let mut payload = vec![0u8; size + 1];
        stream.read_exact(&mut payload).await.expect("read a frame");
        assert_eq!(payload.pop(), Some(FRAME_END), "a frame's end");
        if head[0] != FRAME_METHOD {
            continue;
        }
        let got = (
            u16::from_be_bytes([payload[0], payload[1]]),
            u16::from_be_bytes([payload[2], payload[3]]),
        );
        assert!(
            got != (10, 50) && got != (20, 40),
            "the broker closed: {}",
            String::from_utf8_lossy(&payload)
        );
        if got == (class, id) {
            return payload.split_off(4);
        }
    }
}

/// Publishes `body` with `properties` to `exchange` on the broker at
/// `host_port` as guest, and waits for the broker's confirm.
pub async fn publish(host_port: &str, exchange: &str, properties: RawProperties<'_>, body: &[u8]) {
    let mut s = TcpStream::connect(host_port).await.expect("connect");
    s.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
    expect(&mut s, 10, 10).await; // connection.start
    let mut args = Vec::new();
    args.extend_from_slice(&0u32.to_be_bytes()); // client properties: none
    short(&mut args, b"PLAIN");
    long(&mut args, b"\0guest\0guest");
    short(&mut args, b"en_US");
    send(&mut s, FRAME_METHOD, 0, &method(10, 11, &args)).await;
    let tune = expect(&mut s, 10, 30).await;
    // channel-max and frame-max as offered, no heartbeats.
    let mut args = tune[..6].to_vec();
    args.extend_from_slice(&0u16.to_be_bytes());
    send(&mut s, FRAME_METHOD, 0, &method(10, 31, &args)).await;
    let mut args = Vec::new();
    short(&mut args, b"/");
    short(&mut args, b"");
    args.push(0);
    send(&mut s, FRAME_METHOD, 0, &method(10, 40, &args)).await;
    expect(&mut s, 10, 41).await;
    send(&mut s, FRAME_METHOD, 1, &method(20, 10, &[0])).await;
    expect(&mut s, 20, 11).await;
    send(&mut s, FRAME_METHOD, 1, &method(85, 10, &[0])).await;
    expect(&mut s, 85, 11).await;

    let mut args = 0u16.to_be_bytes().to_vec();
    short(&mut args, exchange.as_bytes());
    short(&mut args, b"");
    args.push(0);
    send(&mut s, FRAME_METHOD, 1, &method(60, 40, &args)).await;
    let header = content_header(body.len(), &properties);
    assert!(
        header.len() <= BROKER_MAX_FRAME_PAYLOAD,
        "the content header fits a frame"
    );
    send(&mut s, FRAME_HEADER, 1, &header).await;
    send(&mut s, FRAME_BODY, 1, body).await;
    expect(&mut s, 60, 80).await; // basic.ack

    let mut args = 200u16.to_be_bytes().to_vec();
    short(&mut args, b"done");
    args.extend_from_slice(&[0, 0, 0, 0]);
    send(&mut s, FRAME_METHOD, 0, &method(10, 50, &args)).await;
    let _ = expect(&mut s, 10, 51).await;
}
