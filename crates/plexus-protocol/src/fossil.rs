//! Fossil deltas: the delta format of the Fossil SCM, which Centrifugo's delta compression
//! uses (`delta: "fossil"` in a subscribe request). A delta describes a target as copies of
//! ranges of a source and literal inserts, so that a subscriber holding the previous
//! publication rebuilds the next from a few bytes.
//!
//! ```text
//! header   LEN "\n"          the target's length
//! copy     CNT "@" OFS ","   CNT bytes of the source, from offset OFS
//! insert   CNT ":" BYTES     CNT bytes taken literally
//! end      SUM ";"           the target's checksum ([`checksum`])
//! ```
//!
//! Numbers are written in base 64, most significant digit first, with the digits
//! `0-9 A-Z _ a-z ~`. The encoder here is our own: it indexes the source in 16-byte blocks and
//! slides a rolling hash over the target, taking the longest verified match at each place.
//! [`create_text`] cuts inserts only between characters, so that a delta of UTF-8 text is
//! itself UTF-8 text (the JSON protocol sends deltas as JSON strings).

/// Base-64 digits, by value.
const DIGITS: &[u8; 64] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~";

/// The source is indexed in blocks of this many bytes; a match is at least one block long.
const BLOCK: usize = 16;

/// A shorter match (after cutting it to whole characters) is written as an insert: its copy
/// command would save next to nothing.
const MIN_COPY: usize = 8;

/// How many source blocks with the same hash are compared at one place of the target.
const MAX_CANDIDATES: usize = 32;

/// A source up to this long is indexed at every byte, so that a match is found wherever it
/// starts; a longer one every [`BLOCK`] bytes (as Fossil's own encoder does), to keep the
/// index small.
const DENSE_INDEX: usize = 64 * 1024;

/// Multiplier of the rolling hash.
const PRIME: u32 = 0x0100_0193;

const NONE: u32 = u32::MAX;

/// Why a delta could not be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad fossil delta: {0}")]
pub struct DeltaError(&'static str);

/// The delta that turns `source` into `target`.
pub fn create(source: &[u8], target: &[u8]) -> Vec<u8> {
    encode(source, target, false)
}

/// The delta that turns the text `source` into `target`, itself text: every insert holds whole
/// characters.
pub fn create_text(source: &str, target: &str) -> String {
    match String::from_utf8(encode(source.as_bytes(), target.as_bytes(), true)) {
        Ok(delta) => delta,
        // Not reached: inserts are cut at character boundaries, the rest is ASCII. A delta
        // of one insert is text in any case.
        Err(_) => String::from_utf8(encode(&[], target.as_bytes(), true))
            .unwrap_or_else(|_| unreachable!("an insert of text is text")),
    }
}

/// The target a delta describes, given the source it was made from.
pub fn apply(source: &[u8], delta: &[u8]) -> Result<Vec<u8>, DeltaError> {
    let mut reader = Reader { delta, at: 0 };
    let len = reader.int()?;
    if reader.byte() != Some(b'\n') {
        return Err(DeltaError("the length is not followed by a newline"));
    }
    // Grown as commands add to it, each checked against the announced length first.
    let mut out = Vec::with_capacity(len.min(1 << 16) as usize);
    loop {
        let count = reader.int()?;
        let op = reader.byte();
        if matches!(op, Some(b'@' | b':')) && out.len() as u64 + count > len {
            return Err(DeltaError("the target is longer than announced"));
        }
        match op {
            Some(b'@') => {
                let offset = reader.int()?;
                if reader.byte() != Some(b',') {
                    return Err(DeltaError("a copy is not followed by a comma"));
                }
                let range = usize::try_from(offset)
                    .ok()
                    .zip(usize::try_from(count).ok())
                    .and_then(|(offset, count)| Some(offset..offset.checked_add(count)?))
                    .filter(|range| range.end <= source.len())
                    .ok_or(DeltaError("a copy reaches past the source"))?;
                out.extend_from_slice(&source[range]);
            }
            Some(b':') => {
                let bytes = usize::try_from(count)
                    .ok()
                    .and_then(|count| reader.take(count))
                    .ok_or(DeltaError("an insert reaches past the delta"))?;
                out.extend_from_slice(bytes);
            }
            Some(b';') => {
                if out.len() as u64 != len {
                    return Err(DeltaError("the target's length is not the one announced"));
                }
                if u64::from(checksum(&out)) != count {
                    return Err(DeltaError("the target's checksum does not match"));
                }
                return Ok(out);
            }
            Some(_) => return Err(DeltaError("unknown command")),
            None => return Err(DeltaError("the delta ends without a checksum")),
        }
    }
}

/// Fossil's checksum: the sum, modulo 2³², of the data read as big-endian 32-bit words, the
/// last one padded with zero bytes.
pub fn checksum(data: &[u8]) -> u32 {
    let mut words = data.chunks_exact(4);
    let mut sum = 0u32;
    for word in &mut words {
        sum = sum.wrapping_add(u32::from_be_bytes([word[0], word[1], word[2], word[3]]));
    }
    let mut last = [0u8; 4];
    last[..words.remainder().len()].copy_from_slice(words.remainder());
    sum.wrapping_add(u32::from_be_bytes(last))
}

fn put_int(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 11];
    let mut n = 0;
    loop {
        digits[n] = DIGITS[(value & 63) as usize];
        n += 1;
        value >>= 6;
        if value == 0 {
            break;
        }
    }
    out.extend(digits[..n].iter().rev());
}

fn put_insert(out: &mut Vec<u8>, bytes: &[u8]) {
    put_int(out, bytes.len() as u64);
    out.push(b':');
    out.extend_from_slice(bytes);
}

fn put_copy(out: &mut Vec<u8>, count: usize, offset: usize) {
    put_int(out, count as u64);
    out.push(b'@');
    put_int(out, offset as u64);
    out.push(b',');
}

fn digit_value(byte: u8) -> Option<u64> {
    let value = match byte {
        b'0'..=b'9' => byte - b'0',
        b'A'..=b'Z' => byte - b'A' + 10,
        b'_' => 36,
        b'a'..=b'z' => byte - b'a' + 37,
        b'~' => 63,
        _ => return None,
    };
    Some(u64::from(value))
}

struct Reader<'a> {
    delta: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let byte = self.delta.get(self.at).copied();
        self.at += 1;
        byte
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let bytes = self.delta.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(bytes)
    }

    fn int(&mut self) -> Result<u64, DeltaError> {
        let mut value: u64 = 0;
        let mut digits = 0;
        while let Some(digit) = self.delta.get(self.at).and_then(|&b| digit_value(b)) {
            value = value
                .checked_mul(64)
                .map(|value| value + digit)
                .filter(|value| *value <= u64::from(u32::MAX))
                .ok_or(DeltaError("a number is too large"))?;
            self.at += 1;
            digits += 1;
        }
        if digits == 0 {
            return Err(DeltaError("a number is missing"));
        }
        Ok(value)
    }
}

fn block_hash(block: &[u8]) -> u32 {
    block.iter().fold(0u32, |hash, &byte| {
        hash.wrapping_mul(PRIME).wrapping_add(u32::from(byte))
    })
}

/// `PRIME` to the power `BLOCK - 1`: the weight of a block's first byte in its hash.
fn first_weight() -> u32 {
    (1..BLOCK).fold(1u32, |weight, _| weight.wrapping_mul(PRIME))
}

/// Whether a text may be cut at `at` (not inside a UTF-8 sequence).
fn is_boundary(text: &[u8], at: usize) -> bool {
    text.get(at).is_none_or(|&byte| byte & 0xC0 != 0x80)
}

/// The source's blocks (of [`BLOCK`] bytes, starting every `step` bytes) by hash:
/// `heads[hash & mask]` is the last block in that bucket, and `chain[block]` the one before it.
struct Index {
    heads: Vec<u32>,
    chain: Vec<u32>,
    mask: usize,
    step: usize,
}

impl Index {
    fn new(source: &[u8], weight: u32) -> Index {
        let step = if source.len() <= DENSE_INDEX {
            1
        } else {
            BLOCK
        };
        let blocks = (source.len() - BLOCK) / step + 1;
        let size = blocks.next_power_of_two();
        let mut index = Index {
            heads: vec![NONE; size],
            chain: vec![NONE; blocks],
            mask: size - 1,
            step,
        };
        let mut hash = block_hash(&source[..BLOCK]);
        for block in 0..blocks {
            let at = block * step;
            if block > 0 {
                hash = if step == 1 {
                    roll(hash, weight, source[at - 1], source[at + BLOCK - 1])
                } else {
                    block_hash(&source[at..][..BLOCK])
                };
            }
            let bucket = hash as usize & index.mask;
            index.chain[block] = index.heads[bucket];
            index.heads[bucket] = block as u32;
        }
        index
    }

    fn candidates(&self, hash: u32) -> impl Iterator<Item = usize> + '_ {
        let mut next = self.heads[hash as usize & self.mask];
        std::iter::from_fn(move || {
            let block = (next != NONE).then_some(next as usize)?;
            next = self.chain[block];
            Some(block * self.step)
        })
        .take(MAX_CANDIDATES)
    }
}

/// The hash of the block one byte further: `out` leaves it, `into` enters.
fn roll(hash: u32, weight: u32, out: u8, into: u8) -> u32 {
    hash.wrapping_sub(u32::from(out).wrapping_mul(weight))
        .wrapping_mul(PRIME)
        .wrapping_add(u32::from(into))
}

/// A match: `len` bytes of the target from `target_at` equal the source's from `source_at`.
#[derive(Clone, Copy)]
struct Match {
    target_at: usize,
    source_at: usize,
    len: usize,
}

fn encode(source: &[u8], target: &[u8], text: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(target.len() / 4 + 32);
    put_int(&mut out, target.len() as u64);
    out.push(b'\n');
    // Where the pending insert starts: everything before it is written.
    let mut pending = 0;
    if source.len() >= BLOCK && target.len() >= BLOCK {
        let weight = first_weight();
        let index = Index::new(source, weight);
        let mut at = 0;
        let mut hash = block_hash(&target[..BLOCK]);
        loop {
            let mut best: Option<Match> = None;
            for source_at in index.candidates(hash) {
                if source[source_at..][..BLOCK] != target[at..][..BLOCK] {
                    continue;
                }
                let mut end = BLOCK;
                while source_at + end < source.len()
                    && at + end < target.len()
                    && source[source_at + end] == target[at + end]
                {
                    end += 1;
                }
                let mut back = 0;
                while back < at - pending
                    && back < source_at
                    && source[source_at - back - 1] == target[at - back - 1]
                {
                    back += 1;
                }
                let mut found = Match {
                    target_at: at - back,
                    source_at: source_at - back,
                    len: back + end,
                };
                if text {
                    while found.len > 0 && !is_boundary(target, found.target_at) {
                        found.target_at += 1;
                        found.source_at += 1;
                        found.len -= 1;
                    }
                    while found.len > 0 && !is_boundary(target, found.target_at + found.len) {
                        found.len -= 1;
                    }
                }
                if found.len >= MIN_COPY && best.is_none_or(|best| found.len > best.len) {
                    best = Some(found);
                }
            }
            match best {
                Some(found) => {
                    if found.target_at > pending {
                        put_insert(&mut out, &target[pending..found.target_at]);
                    }
                    put_copy(&mut out, found.len, found.source_at);
                    pending = found.target_at + found.len;
                    at = pending;
                    if at + BLOCK > target.len() {
                        break;
                    }
                    hash = block_hash(&target[at..][..BLOCK]);
                }
                None => {
                    if at + BLOCK >= target.len() {
                        break;
                    }
                    hash = roll(hash, weight, target[at], target[at + BLOCK]);
                    at += 1;
                }
            }
        }
    }
    if pending < target.len() {
        put_insert(&mut out, &target[pending..]);
    }
    put_int(&mut out, u64::from(checksum(target)));
    out.push(b';');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), for varied inputs without a dependency.
    struct Noise(u64);

    impl Noise {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn bytes(&mut self, n: usize, alphabet: &[u8]) -> Vec<u8> {
            (0..n)
                .map(|_| alphabet[(self.next() % alphabet.len() as u64) as usize])
                .collect()
        }

        /// `data` with a few bytes changed, a range removed and one inserted.
        fn edit(&mut self, data: &[u8], alphabet: &[u8]) -> Vec<u8> {
            let mut out = data.to_vec();
            if out.is_empty() {
                return self.bytes(5, alphabet);
            }
            for _ in 0..3 {
                let at = (self.next() % out.len() as u64) as usize;
                out[at] = alphabet[(self.next() % alphabet.len() as u64) as usize];
            }
            let at = (self.next() % out.len() as u64) as usize;
            let cut = ((self.next() % 20) as usize).min(out.len() - at);
            out.drain(at..at + cut);
            let at = (self.next() % (out.len() as u64 + 1)) as usize;
            let n = (self.next() % 30) as usize;
            let inserted = self.bytes(n, alphabet);
            out.splice(at..at, inserted);
            out
        }
    }

    #[test]
    fn checksum_sums_big_endian_words() {
        assert_eq!(checksum(b""), 0);
        assert_eq!(checksum(b"abc"), 0x6162_6300);
        assert_eq!(checksum(b"abcd"), 0x6162_6364);
        assert_eq!(checksum(b"abcde"), 0x6162_6364 + 0x6500_0000);
        assert_eq!(checksum(&[0xff; 8]), 0xffff_fffe);
    }

    #[test]
    fn numbers_use_the_base_64_digits() {
        let mut out = Vec::new();
        for value in [0, 9, 10, 36, 37, 63, 64, 4095, u64::from(u32::MAX)] {
            out.clear();
            put_int(&mut out, value);
            out.push(b';');
            let mut reader = Reader { delta: &out, at: 0 };
            assert_eq!(reader.int().unwrap(), value);
        }
        out.clear();
        put_int(&mut out, 64 * 36 + 63);
        assert_eq!(out, b"_~");
    }

    #[test]
    fn a_known_delta() {
        let source = b"The quick brown fox jumps over the lazy dog.";
        let target = b"The quick brown fox jumps over the lazy cat.";
        let delta = create(source, target);
        // Copy the first 40 bytes, insert "cat.".
        let expected = format!("h\nd@0,4:cat.{};", {
            let mut sum = Vec::new();
            put_int(&mut sum, u64::from(checksum(target)));
            String::from_utf8(sum).unwrap()
        });
        assert_eq!(String::from_utf8(delta.clone()).unwrap(), expected);
        assert_eq!(apply(source, &delta).unwrap(), target);
    }

    #[test]
    fn the_example_of_docs_protocol_md() {
        let delta = create_text(
            r#"{"symbol":"BTC","price":50000}"#,
            r#"{"symbol":"BTC","price":50017}"#,
        );
        assert_eq!(delta, "U\nR@0,3:17}1HXElc;");
    }

    #[test]
    fn round_trips() {
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
        let binary: Vec<u8> = (0..=255).collect();
        let alphabets: [&[u8]; 3] = [b"ab", b"{}\":,0123456789abcdefghij ", &binary];
        for round in 0..300 {
            let alphabet = alphabets[round % 3];
            let len = (noise.next() % 600) as usize;
            let source = noise.bytes(len, alphabet);
            let target = noise.edit(&source, alphabet);
            let delta = create(&source, &target);
            assert_eq!(apply(&source, &delta).unwrap(), target, "round {round}");
            // Unrelated data too.
            let other = noise.bytes(len / 2, alphabet);
            assert_eq!(apply(&source, &create(&source, &other)).unwrap(), other);
        }
        assert_eq!(apply(b"", &create(b"", b"")).unwrap(), b"");
        assert_eq!(apply(b"abc", &create(b"abc", b"")).unwrap(), b"");
        assert_eq!(apply(b"", &create(b"", b"xyz")).unwrap(), b"xyz");
    }

    #[test]
    fn similar_documents_give_small_deltas() {
        let document = |price: u32| {
            format!(
                r#"{{"symbol":"BTC","price":{price},"volume":123456,"bid":{},"ask":{},"exchange":"plexus","updated":"2026-11-22T10:00:00Z"}}"#,
                price - 1,
                price + 1
            )
        };
        let (source, target) = (document(50_000), document(50_017));
        let delta = create_text(&source, &target);
        // Copies around the three changed numbers (45 bytes for 123).
        assert!(
            delta.len() * 2 < target.len(),
            "{} bytes for {}",
            delta.len(),
            target.len()
        );
        assert_eq!(
            apply(source.as_bytes(), delta.as_bytes()).unwrap(),
            target.as_bytes()
        );
    }

    #[test]
    fn text_deltas_cut_between_characters() {
        let mut noise = Noise(42);
        // Characters of one to four bytes, where a byte-wise match would end inside one.
        let chars = ["a", "é", "è", "ж", "з", "€", "₽", "😀", "😁", "{"];
        for round in 0..300 {
            let text = |noise: &mut Noise, n: usize| -> String {
                (0..n)
                    .map(|_| chars[(noise.next() % chars.len() as u64) as usize])
                    .collect()
            };
            let len = (noise.next() % 200) as usize;
            let source = text(&mut noise, len);
            let mut target = source.clone();
            for _ in 0..3 {
                let at = target
                    .char_indices()
                    .nth((noise.next() % (target.chars().count() as u64 + 1)) as usize)
                    .map_or(target.len(), |(at, _)| at);
                let inserted = text(&mut noise, 2);
                target.insert_str(at, &inserted);
            }
            let delta = create_text(&source, &target);
            assert_eq!(
                apply(source.as_bytes(), delta.as_bytes()).unwrap(),
                target.as_bytes(),
                "round {round}"
            );
        }
    }

    #[test]
    fn bad_deltas_are_errors() {
        let source = b"0123456789abcdefghijklmnopqrstuvwxyz";
        let good = create(source, b"0123456789abcdefghij--klmnopqrstuvwxyz");
        assert!(apply(source, &good).is_ok());
        for bad in [
            &b""[..],
            b"5",
            b"5\n",
            b"5\n5:ab",
            b"3\n3@40,0;",
            b"3\n3?0,",
            b"2\n3:abc0;",
            b"zzzzzzzzzzzz\n",
            b"3\n4:abcd0;",
            b"2\n3@0,0;",
        ] {
            assert!(
                apply(source, bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut wrong_sum = good.clone();
        let last = wrong_sum.len() - 2;
        wrong_sum[last] = if wrong_sum[last] == b'0' { b'1' } else { b'0' };
        assert!(apply(source, &wrong_sum).is_err());
        // Applied to another source, a copy gives other bytes: the checksum says so.
        assert!(apply(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", &good).is_err());
    }
}
