//! What the `csv` crate cannot say about a file's shape, found on the bytes on their
//! way to it: a quote that is never closed, and a record too long to buffer.
//!
//! [`RecordLimiter`] sits between the file and the CSV reader and follows CSV's
//! quoting the way `csv_core` does (a quote opens a quoted field only at the start of
//! a field; `""` inside one is an escaped quote). It passes the bytes on unchanged,
//! except for a record longer than `max_record_bytes`: the rest of that record is
//! dropped (its line breaks are kept, so that line numbers stay right), and the
//! record is closed where it really ends. So no record costs more memory than the
//! limit, and the reader asks [`RecordLimiter::oversized`] whether the record it got
//! was cut.

use std::io::Read;

/// Where the parser is, as far as records and quotes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a field (also of a record).
    FieldStart,
    /// In an unquoted field.
    Unquoted,
    /// In a quoted field.
    Quoted,
    /// Just after a quote in a quoted field: the end of it, or the first of `""`.
    QuoteInQuoted,
}

/// Follows a CSV byte stream's records (see the module doc).
pub(crate) struct RecordLimiter<R> {
    inner: R,
    delimiter: u8,
    quote: u8,
    max_record_bytes: u64,
    state: State,
    /// The line the current record started on, and the line now (1-based).
    record_line: u64,
    line: u64,
    /// Bytes of the current record seen so far.
    record_bytes: u64,
    /// The line where the quoted field now open started.
    quote_line: u64,
    /// Dropping the rest of an oversized record; the state the reader was left in.
    skipping: Option<State>,
    /// Lines where records were cut, in order; the reader takes them as it meets them.
    oversized: std::collections::VecDeque<u64>,
    /// At the end of the input: the line of a quoted field never closed.
    open_quote_at_end: Option<u64>,
    /// Bytes to hand out before reading more (the end of a cut record).
    pending: Vec<u8>,
    /// Input read but not yet looked at, to go through before reading more.
    carry: Vec<u8>,
    /// Skip runs of plain bytes at once (off only to test against the byte-wise walk).
    scan: bool,
}

impl<R: Read> RecordLimiter<R> {
    /// Follows `inner` from its first line (the header's).
    pub(crate) fn new(inner: R, delimiter: u8, quote: u8, max_record_bytes: u64) -> Self {
        RecordLimiter {
            inner,
            delimiter,
            quote,
            max_record_bytes: max_record_bytes.max(1),
            state: State::FieldStart,
            record_line: 1,
            line: 1,
            record_bytes: 0,
            quote_line: 0,
            skipping: None,
            oversized: Default::default(),
            open_quote_at_end: None,
            pending: Vec::new(),
            carry: Vec::new(),
            scan: true,
        }
    }

    /// Whether the record that started on `line` was cut for being too long.
    pub(crate) fn oversized(&mut self, line: u64) -> bool {
        while let Some(&first) = self.oversized.front() {
            if first < line {
                self.oversized.pop_front();
            } else {
                if first == line {
                    self.oversized.pop_front();
                    return true;
                }
                return false;
            }
        }
        false
    }

    /// Once the input is read to its end: the line where a quoted field that was never
    /// closed starts.
    pub(crate) fn open_quote_at_end(&self) -> Option<u64> {
        self.open_quote_at_end
    }

    /// Advances the quoting state over one byte; true at the end of a record.
    fn step(&mut self, b: u8) -> bool {
        let (next, end) = match (self.state, b) {
            (State::Quoted, _) if b == self.quote => (State::QuoteInQuoted, false),
            (State::Quoted, b'\n') => {
                self.line += 1;
                (State::Quoted, false)
            }
            (State::Quoted, _) => (State::Quoted, false),
            (State::QuoteInQuoted, _) if b == self.quote => (State::Quoted, false),
            (State::FieldStart, _) if b == self.quote => {
                self.quote_line = self.line;
                (State::Quoted, false)
            }
            (_, b'\n') => {
                self.line += 1;
                (State::FieldStart, true)
            }
            (_, _) if b == self.delimiter => (State::FieldStart, false),
            _ => (State::Unquoted, false),
        };
        self.state = next;
        end
    }
}

impl<R: Read> Read for RecordLimiter<R> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if !self.pending.is_empty() {
            let n = self.pending.len().min(out.len());
            out[..n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            return Ok(n);
        }
        loop {
            let n = if self.carry.is_empty() {
                self.inner.read(out)?
            } else {
                let n = self.carry.len().min(out.len());
                out[..n].copy_from_slice(&self.carry[..n]);
                self.carry.drain(..n);
                n
            };
            if n == 0 {
                if matches!(self.state, State::Quoted) {
                    self.open_quote_at_end = Some(self.quote_line);
                }
                if let Some(left_in) = self.skipping.take() {
                    // The cut record ran to the end of the input.
                    if left_in == State::Quoted {
                        self.pending.push(self.quote);
                        return self.read(out);
                    }
                }
                return Ok(0);
            }
            // Walk the bytes, compacting in place what is passed on.
            let mut kept = 0;
            let mut i = 0;
            while i < n {
                // Runs without a quote or a line break change nothing but the count
                // and whether a field just started: skip them whole (`memchr`), as long
                // as nothing has been dropped from this buffer and the record stays
                // within its limit.
                if self.scan
                    && self.skipping.is_none()
                    && kept == i
                    && self.state != State::QuoteInQuoted
                {
                    let rest = &out[i..n];
                    let run = memchr::memchr2(self.quote, b'\n', rest).unwrap_or(rest.len());
                    if run > 0 && self.record_bytes + run as u64 <= self.max_record_bytes {
                        if self.record_bytes == 0 {
                            self.record_line = self.line;
                        }
                        self.record_bytes += run as u64;
                        if self.state != State::Quoted {
                            self.state = if rest[run - 1] == self.delimiter {
                                State::FieldStart
                            } else {
                                State::Unquoted
                            };
                        }
                        i += run;
                        kept += run;
                        continue;
                    }
                }
                let b = out[i];
                if self.record_bytes == 0 {
                    self.record_line = self.line;
                }
                self.record_bytes += 1;
                // What the reader has seen ends before this byte.
                let before = self.state;
                let end = self.step(b);
                match self.skipping {
                    None if self.record_bytes > self.max_record_bytes && !end => {
                        self.oversized.push_back(self.record_line);
                        self.skipping = Some(before);
                    }
                    None => {
                        out[kept] = b;
                        kept += 1;
                    }
                    Some(left_in) if end => {
                        // Close what the reader was left in, then end the record.
                        if left_in == State::Quoted {
                            out[kept] = self.quote;
                            kept += 1;
                            // The line break goes next; what follows it waits its turn.
                            self.pending.push(b'\n');
                            let rest = out[i + 1..n].to_vec();
                            self.carry.splice(0..0, rest);
                            self.skipping = None;
                            self.record_bytes = 0;
                            return Ok(kept);
                        } else {
                            out[kept] = b'\n';
                            kept += 1;
                        }
                        self.skipping = None;
                    }
                    Some(left_in) => {
                        // Line breaks inside the cut quoted field still count as lines.
                        if b == b'\n' && left_in == State::Quoted {
                            out[kept] = b;
                            kept += 1;
                        }
                    }
                }
                if end {
                    self.record_bytes = 0;
                }
                i += 1;
            }
            if kept > 0 || !self.pending.is_empty() {
                if kept == 0 {
                    return self.read(out);
                }
                return Ok(kept);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn through(input: &[u8], max: u64) -> (Vec<u8>, RecordLimiter<&[u8]>) {
        let mut limiter = RecordLimiter::new(input, b',', b'"', max);
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        loop {
            let n = limiter.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        (out, limiter)
    }

    #[test]
    fn well_formed_input_passes_unchanged() {
        let input = b"a,b\n1,\"x\ny\"\n2,\"he said \"\"hi\"\"\"\n3,a\"b\n";
        let (out, mut limiter) = through(input, 1 << 20);
        assert_eq!(out, input);
        assert_eq!(limiter.open_quote_at_end(), None);
        assert!(!limiter.oversized(2));
    }

    #[test]
    fn an_unclosed_quote_is_found_at_the_end_with_its_line() {
        let (_, limiter) = through(b"a,b\n1,2\n3,\"open\n4,5\n", 1 << 20);
        assert_eq!(limiter.open_quote_at_end(), Some(3));
    }

    #[test]
    fn an_oversized_record_is_cut_and_closed_keeping_its_line_breaks() {
        let long = format!("a,b\n1,\"{}\n{}\"\n2,ok\n", "x".repeat(50), "y".repeat(50));
        let (out, mut limiter) = through(long.as_bytes(), 20);
        let text = String::from_utf8(out).unwrap();
        assert!(text.len() < 40, "{text:?}");
        assert!(text.ends_with("\"\n2,ok\n"), "{text:?}");
        assert_eq!(text.matches('\n').count(), 4, "line breaks kept: {text:?}");
        assert!(limiter.oversized(2));
        assert!(!limiter.oversized(4));
        let unquoted = format!("a,b\n1,{}\n2,ok\n", "z".repeat(100));
        let (out, mut limiter) = through(unquoted.as_bytes(), 20);
        assert!(String::from_utf8(out).unwrap().ends_with("\n2,ok\n"));
        assert!(limiter.oversized(2));
    }

    /// Skipping runs whole gives what the byte-by-byte walk gives: the same bytes, the
    /// same cut records, the same unclosed quote, over generated input read in small
    /// and large pieces.
    #[test]
    fn skipping_plain_runs_changes_nothing() {
        let alphabet = [b'a', b'b', b',', b'"', b'\n', b'x', b'"', b'\r'];
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        for case in 0..2000 {
            let len = (case % 200) + 1;
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    alphabet[(seed % alphabet.len() as u64) as usize]
                })
                .collect();
            for (max, piece) in [(1 << 20, 7), (12, 5), (5, 64), (30, 3)] {
                let walk = |scan: bool| {
                    let mut limiter = RecordLimiter::new(input.as_slice(), b',', b'"', max);
                    limiter.scan = scan;
                    let mut out = Vec::new();
                    let mut buf = vec![0u8; piece];
                    loop {
                        let n = limiter.read(&mut buf).unwrap();
                        if n == 0 {
                            break;
                        }
                        out.extend_from_slice(&buf[..n]);
                    }
                    (out, limiter.oversized.clone(), limiter.open_quote_at_end())
                };
                assert_eq!(
                    walk(true),
                    walk(false),
                    "input {:?}, max {max}, piece {piece}",
                    String::from_utf8_lossy(&input)
                );
            }
        }
    }
}
