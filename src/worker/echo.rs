//! The echo itself (RFC 862): read what the client sends, write it back.
//!
//! Blocking I/O on the connection's own thread: one `read` into the thread's
//! buffer, one `write_all` of the same bytes, repeated until the client
//! closes. Nothing is allocated, locked or counted in shared memory per read;
//! the handler counts into its private tally and hands it over at the end
//! (or once per `flush_due` tick on long connections).
//!
//! A client that half-closes (shutdown(SHUT_WR)) still gets every byte: each
//! read is fully written back before the next read, so by the time `read`
//! returns 0 nothing is owed. A client that stops reading is bounded by
//! SO_SNDTIMEO (inherited from the listener): the stalled write fails with
//! WouldBlock. An idle client is cut by the worker's tick (`pool::ConnSlot`).

use std::io::{ErrorKind, Read, Write};

use crate::config::Transform;
use crate::worker::counters::{Ending, Tally};

/// Echoes until the client closes or an error ends the connection.
///
/// `flush_due` is polled after every echo and gets the tally when it says
/// so; the caller decides what "periodically" means.
pub fn echo<S: Read + Write>(
    stream: &mut S,
    buf: &mut [u8],
    transform: Transform,
    tally: &mut Tally,
    mut flush_due: impl FnMut(&mut Tally),
) -> Ending {
    loop {
        let n = match stream.read(buf) {
            Ok(0) => return Ending::Clean,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return ending_of(e.kind()),
        };
        tally.bytes_in += n as u64;
        let data = &mut buf[..n];
        if transform == Transform::Upper {
            data.make_ascii_uppercase();
        }
        if let Err(e) = write_counted(stream, data, tally) {
            return ending_of(e.kind());
        }
        flush_due(tally);
    }
}

/// `write_all` that counts every byte the kernel took, also when a later
/// write fails: a client that resets mid-echo did receive (or at least was
/// sent) the first part, and `echod_bytes_sent_total` must say so.
pub(crate) fn write_counted<W: Write>(w: &mut W, mut data: &[u8], tally: &mut Tally) -> std::io::Result<()> {
    while !data.is_empty() {
        match w.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => {
                tally.bytes_out += n as u64;
                data = &data[n..];
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How an I/O error ends a connection, for the error counters.
pub(crate) fn ending_of(kind: ErrorKind) -> Ending {
    match kind {
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => Ending::Reset,
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Ending::Timeout,
        _ => Ending::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{self, Cursor};

    /// An in-memory client: reads come from `input` in `chunk`-sized pieces,
    /// writes collect in `output`.
    struct Script {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
        chunk: usize,
        fail_write: Option<ErrorKind>,
        /// Writes fail (with `fail_write`) once this many bytes went out.
        fail_after: usize,
    }
    impl Read for Script {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            let n = b.len().min(self.chunk);
            self.input.read(&mut b[..n])
        }
    }
    impl Write for Script {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            if let Some(k) = self.fail_write.filter(|_| self.output.len() >= self.fail_after) {
                return Err(k.into());
            }
            let n = b.len().min(3); // short writes: write_all must loop
            self.output.extend_from_slice(&b[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn echoes_every_byte_and_counts_them() {
        let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let mut s =
            Script { input: Cursor::new(data.clone()), output: vec![], chunk: 700, fail_write: None, fail_after: 0 };
        let mut tally = Tally::default();
        let mut flushes = 0;
        let end = echo(&mut s, &mut [0u8; 512], Transform::None, &mut tally, |_| flushes += 1);
        assert_eq!(end, Ending::Clean);
        assert_eq!(s.output, data);
        assert_eq!((tally.bytes_in, tally.bytes_out), (10_000, 10_000));
        assert_eq!(flushes, 10_000usize.div_ceil(512));
    }

    #[test]
    fn upper_changes_only_ascii_letters() {
        let mut s = Script {
            input: Cursor::new(b"abc\xffz-\x00q".to_vec()),
            output: vec![],
            chunk: 64,
            fail_write: None,
            fail_after: 0,
        };
        echo(&mut s, &mut [0u8; 64], Transform::Upper, &mut Tally::default(), |_| {});
        assert_eq!(s.output, b"ABC\xffZ-\x00Q");
    }

    #[test]
    fn errors_are_classified() {
        let mut s = Script {
            input: Cursor::new(b"x".to_vec()),
            output: vec![],
            chunk: 64,
            fail_write: Some(ErrorKind::BrokenPipe),
            fail_after: 0,
        };
        assert_eq!(echo(&mut s, &mut [0u8; 8], Transform::None, &mut Tally::default(), |_| {}), Ending::Reset);
        s = Script {
            input: Cursor::new(b"x".to_vec()),
            output: vec![],
            chunk: 64,
            fail_write: Some(ErrorKind::WouldBlock),
            fail_after: 0,
        };
        assert_eq!(echo(&mut s, &mut [0u8; 8], Transform::None, &mut Tally::default(), |_| {}), Ending::Timeout);
    }

    #[test]
    fn bytes_written_before_a_failed_write_are_counted() {
        // Short writes of 3 bytes: 6 go out, then the client resets.
        let mut s = Script {
            input: Cursor::new(b"0123456789".to_vec()),
            output: vec![],
            chunk: 64,
            fail_write: Some(ErrorKind::ConnectionReset),
            fail_after: 6,
        };
        let mut tally = Tally::default();
        assert_eq!(echo(&mut s, &mut [0u8; 64], Transform::None, &mut tally, |_| {}), Ending::Reset);
        assert_eq!(s.output, b"012345");
        assert_eq!((tally.bytes_in, tally.bytes_out), (10, 6), "what went out before the reset counts");
    }
}
