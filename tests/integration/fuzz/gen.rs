//! Input generation for the fuzz tests: a seeded generator, byte mutations of real
//! inputs, and inputs built from scratch out of a decoder's tokens.
//!
//! Shared by the fuzz module of the integration tests and by `tests/fuzz_memory.rs`.
//! Everything is a function of the seed: `BUILDBUS_FUZZ_SEED` (decimal or `0x` hex)
//! replaces the fixed default, and every failure names the seed and the input's number.

#![allow(dead_code)]

/// The seed of a run: `BUILDBUS_FUZZ_SEED`, else a fixed one (CI runs are repeatable).
pub fn seed() -> u64 {
    match std::env::var("BUILDBUS_FUZZ_SEED") {
        Ok(s) => {
            let s = s.trim();
            let parsed = match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => s.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("BUILDBUS_FUZZ_SEED={s:?} is not a number"))
        }
        Err(_) => 0x6275_696c_6462_7573,
    }
}

/// Inputs per decoder: `BUILDBUS_FUZZ_COUNT` (for longer runs by hand), else `default`.
pub fn count(default: usize) -> usize {
    std::env::var("BUILDBUS_FUZZ_COUNT")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default)
}

/// splitmix64: small, fast, good enough to pick mutations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    pub fn chance(&mut self, one_in: usize) -> bool {
        self.below(one_in) == 0
    }

    pub fn byte(&mut self) -> u8 {
        self.next() as u8
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// The largest input a mutation may grow to.
pub const MAX_LEN: usize = 256 << 10;

/// Varints no sane length is written as: 10-byte maximum, overlong, unterminated.
const HUGE_VARINTS: &[&[u8]] = &[
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
    &[0xff, 0xff, 0xff, 0xff, 0x0f],
    &[
        0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x01,
    ],
    &[
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ],
    &[0x80, 0x80, 0x80, 0x80, 0x04],
];

/// Little-endian length fields claiming far more than any input holds.
const HUGE_LENGTHS: &[&[u8]] = &[
    &[0xff, 0xff, 0xff, 0xff],
    &[0xff, 0xff, 0xff, 0x7f],
    &[0x00, 0x00, 0x00, 0x80],
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
    &[0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00],
];

/// What the generator knows of one input language.
pub struct Dialect {
    /// Tokens from which inputs are built from scratch, and inserted by mutations.
    pub tokens: &'static [&'static [u8]],
    /// An opening that nests (and its closing, for the mutation that nests deeply).
    pub nest: &'static [(&'static [u8], &'static [u8])],
}

/// Applies random mutations to `data` (one in half the cases, up to four otherwise, so
/// that many inputs stay close enough to valid to reach deep into the decoders);
/// `others` are splice partners.
pub fn mutate(rng: &mut Rng, data: &[u8], others: &[Vec<u8>], dialect: &Dialect) -> Vec<u8> {
    let mut d = data.to_vec();
    let n = if rng.chance(2) { 1 } else { 2 + rng.below(3) };
    for _ in 0..n {
        mutate_once(rng, &mut d, others, dialect);
        d.truncate(MAX_LEN);
    }
    d
}

fn mutate_once(rng: &mut Rng, d: &mut Vec<u8>, others: &[Vec<u8>], dialect: &Dialect) {
    let at = |rng: &mut Rng, d: &Vec<u8>| rng.below(d.len() + 1);
    match rng.below(12) {
        // Bit flips.
        0 | 1 => {
            if !d.is_empty() {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(d.len());
                    d[i] ^= 1 << rng.below(8);
                }
            }
        }
        // Interesting bytes.
        2 => {
            if !d.is_empty() {
                let i = rng.below(d.len());
                let random = rng.byte();
                d[i] = *rng.pick(&[0x00, 0xff, 0x7f, 0x80, b'\n', b'"', b'<', b'\\', random]);
            }
        }
        // Truncation.
        3 => {
            let i = at(rng, d);
            d.truncate(i);
        }
        // Splice: a prefix of this one and a suffix of another.
        4 => {
            if !others.is_empty() {
                let o = rng.pick(others);
                let i = at(rng, d);
                let j = rng.below(o.len() + 1);
                d.truncate(i);
                d.extend_from_slice(&o[j..]);
            }
        }
        // Random bytes inserted.
        5 => {
            let i = at(rng, d);
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.byte()).collect();
            d.splice(i..i, bytes);
        }
        // A chunk repeated (repeated opcodes, fields, elements).
        6 => {
            if !d.is_empty() {
                let i = rng.below(d.len());
                let n = 1 + rng.below((d.len() - i).min(64));
                let most = if rng.chance(8) { 2000 } else { 16 };
                let times = 1 + rng.below(most);
                let chunk = d[i..i + n].to_vec();
                let rep: Vec<u8> = chunk.iter().copied().cycle().take(n * times).collect();
                d.splice(i..i, rep);
            }
        }
        // A chunk deleted.
        7 => {
            if !d.is_empty() {
                let i = rng.below(d.len());
                let n = 1 + rng.below((d.len() - i).min(256));
                d.drain(i..i + n);
            }
        }
        // A huge varint, inserted or overwriting.
        8 => {
            let v = *rng.pick(HUGE_VARINTS);
            let i = at(rng, d);
            if rng.chance(2) {
                d.splice(i..i, v.iter().copied());
            } else {
                let end = (i + v.len()).min(d.len());
                d.splice(i..end, v.iter().copied());
            }
        }
        // A length field overwritten with a huge one.
        9 => {
            let v = *rng.pick(HUGE_LENGTHS);
            let i = at(rng, d);
            let end = (i + v.len()).min(d.len());
            d.splice(i..end, v.iter().copied());
        }
        // Deep nesting.
        10 => {
            if !dialect.nest.is_empty() {
                let (open, close) = *rng.pick(dialect.nest);
                let most = if rng.chance(2) { 5000 } else { 200 };
                let depth = 1 + rng.below(most);
                let i = at(rng, d);
                let mut n = Vec::with_capacity((open.len() + close.len()) * depth);
                for _ in 0..depth {
                    n.extend_from_slice(open);
                }
                if rng.chance(2) {
                    for _ in 0..depth {
                        n.extend_from_slice(close);
                    }
                }
                d.splice(i..i, n);
            }
        }
        // A token of the language.
        _ => {
            if !dialect.tokens.is_empty() {
                let t = *rng.pick(dialect.tokens);
                let i = at(rng, d);
                d.splice(i..i, t.iter().copied());
            }
        }
    }
}

/// An input from scratch: random bytes, or a sequence of the dialect's tokens.
pub fn generate(rng: &mut Rng, dialect: &Dialect) -> Vec<u8> {
    if dialect.tokens.is_empty() || rng.chance(3) {
        let n = rng.below(512);
        return (0..n).map(|_| rng.byte()).collect();
    }
    let mut d = Vec::new();
    for _ in 0..rng.below(64) {
        if rng.chance(6) {
            d.push(rng.byte());
        } else {
            let t = rng.pick::<&[u8]>(dialect.tokens);
            d.extend_from_slice(t);
        }
    }
    d
}

/// `count` inputs: mostly mutated seeds, a quarter generated from scratch, and the seeds
/// themselves. The `i`th input depends on the seed and `i` only.
pub fn inputs<'a>(
    seed: u64,
    seeds: &'a [Vec<u8>],
    dialect: &'a Dialect,
    count: usize,
) -> Inputs<'a> {
    Inputs {
        seed,
        seeds,
        dialect,
        count,
        i: 0,
    }
}

pub struct Inputs<'a> {
    seed: u64,
    seeds: &'a [Vec<u8>],
    dialect: &'a Dialect,
    count: usize,
    i: usize,
}

/// The `i`th input of a run.
pub fn nth(seed: u64, seeds: &[Vec<u8>], dialect: &Dialect, i: usize) -> Vec<u8> {
    if i < seeds.len() {
        return seeds[i].clone();
    }
    let mut rng = Rng::new(seed ^ (i as u64).wrapping_mul(0xd134_2543_de82_ef95));
    if seeds.is_empty() || rng.chance(4) {
        generate(&mut rng, dialect)
    } else {
        let base = rng.pick(seeds);
        mutate(&mut rng, base, seeds, dialect)
    }
}

impl Iterator for Inputs<'_> {
    type Item = (usize, Vec<u8>);

    fn next(&mut self) -> Option<(usize, Vec<u8>)> {
        if self.i >= self.count {
            return None;
        }
        let i = self.i;
        self.i += 1;
        Some((i, nth(self.seed, self.seeds, self.dialect, i)))
    }
}

// ------------------------------------------------------------------------------------
// Dialects
// ------------------------------------------------------------------------------------

/// Pickle opcodes with operands, as BitBake's pickles (protocol 4) and hostile ones
/// have them.
pub const PICKLE: Dialect = Dialect {
    tokens: &[
        b"\x80\x04",
        b"\x80\x02",
        b"\x95\x20\x00\x00\x00\x00\x00\x00\x00",
        b"\x95\xff\xff\xff\xff\xff\xff\xff\xff",
        b"\x8c\x08bb.event\x94",
        b"\x8c\x0cBuildStarted\x94",
        b"\x93\x94",
        b")\x81\x94",
        b"}\x94(",
        b"\x8c\x03pid\x94K\x07",
        b"s",
        b"u",
        b"b",
        b"(",
        b"t",
        b"l",
        b"d",
        b"e",
        b"a",
        b"0",
        b"1",
        b"2",
        b"]",
        b"\x85",
        b"\x86",
        b"\x87",
        b"\x88",
        b"\x89",
        b"N",
        b".",
        b"R",
        b"\x81",
        b"\x92",
        b"h\x00",
        b"h\xff",
        b"j\xff\xff\xff\xff",
        b"q\x01",
        b"r\xff\xff\xff\x7f",
        b"\x94",
        b"g0\n",
        b"p1\n",
        b"cos\nsystem\n",
        b"cbuiltins\neval\n",
        b"c__builtin__\nset\n",
        b"\x8c\x02re\x94\x8c\x08_compile\x94\x93",
        b"\x8c\x08builtins\x8c\x03set\x93",
        b"\x8c\x07_codecs\x8c\x06encode\x93",
        b"\x8c\x08datetime\x8c\x08datetime\x93",
        b"\x8c\x07copyreg\x8c\x0e_reconstructor\x93",
        b"\x8c\x0bcollections\x8c\x0bOrderedDict\x93",
        b"K\x01",
        b"M\xff\xff",
        b"J\xff\xff\xff\xff",
        b"\x8a\x08\xff\xff\xff\xff\xff\xff\xff\xff",
        b"\x8a\xff",
        b"\x8b\xff\xff\xff\x7f",
        b"G\x7f\xf0\x00\x00\x00\x00\x00\x00",
        b"F1e999\n",
        b"I00\n",
        b"I99999999999999999999999\n",
        b"L123L\n",
        b"X\x05\x00\x00\x00hello",
        b"X\xff\xff\xff\xff",
        b"\x8d\xff\xff\xff\xff\xff\xff\xff\xff",
        b"\x8e\x00\x00\x00\x00\x00\x00\x00\x80",
        b"\x96\x04\x00\x00\x00\x00\x00\x00\x00abcd",
        b"C\x03abc",
        b"B\xff\xff\xff\xff",
        b"U\x03abc",
        b"T\xff\xff\xff\x7f",
        b"S'abc'\n",
        b"V\\u0041\n",
        b"\x8f",
        b"\x90",
        b"\x91",
        b"\x82\x01",
        b"P1\n",
        b"Q",
        b"\x97",
        b"\x98",
    ],
    nest: &[
        (b"]\x94(", b"ea"),
        (b"(", b"t"),
        (b"}(", b"u"),
        (b"]", b"a"),
        (b"\x28\x8c\x01a", b"l"),
        (b")\x81", b"0"),
    ],
};

/// JSON tokens, with BEP's and BitBake's field names.
pub const JSON: Dialect = Dialect {
    tokens: &[
        b"{",
        b"}",
        b"[",
        b"]",
        b",",
        b":",
        b"\"id\":",
        b"\"started\":",
        b"\"uuid\":\"0\"",
        b"\"children\":[",
        b"\"progress\":{",
        b"\"stdout\":\"",
        b"\"buildFinished\":{\"exitCode\":{\"code\":1}}",
        b"\"targetCompleted\":{",
        b"\"namedSet\":{\"id\":\"0\"}",
        b"\"class\": \"bb.event.BuildStarted\"",
        b"\"vars\": \"gASV\"",
        b"\"allvariables\": {",
        b"\"v\": ",
        b"\"x\"",
        b"\"\\ud800\"",
        b"\"\\u0000\"",
        b"1e999",
        b"-0",
        b"18446744073709551616",
        b"null",
        b"true",
        b"\n",
        b"\r\n",
        b"\xef\xbb\xbf",
    ],
    nest: &[
        (b"[", b"]"),
        (b"{\"a\":", b"}"),
        (b"{\"id\":{\"x\":", b"}}"),
    ],
};

/// XML-RPC elements and the XML that must be refused.
pub const XML: Dialect = Dialect {
    tokens: &[
        b"<?xml version=\"1.0\"?>",
        b"<?xml version=\"1.0\" encoding=\"latin1\"?>",
        b"<!DOCTYPE x [<!ENTITY a \"bbbbbbbbbb\">]>",
        b"<methodCall>",
        b"</methodCall>",
        b"<methodResponse>",
        b"</methodResponse>",
        b"<methodName>event.sendpickle</methodName>",
        b"<methodName>event.quit</methodName>",
        b"<params>",
        b"</params>",
        b"<param>",
        b"</param>",
        b"<value>",
        b"</value>",
        b"<base64>",
        b"</base64>",
        b"gASVLAAAAAAAAACMCGJiLmV2ZW50lIwMQ29uZmlnUGFyc2VklJOUKYGUfZSMA3BpZJRLAHNiLg==",
        b"<array><data>",
        b"</data></array>",
        b"<struct><member><name>a</name>",
        b"</member></struct>",
        b"<int>1</int>",
        b"<i8>99999999999999999999</i8>",
        b"<double>1e999</double>",
        b"<boolean>2</boolean>",
        b"<nil/>",
        b"<string>x</string>",
        b"<dateTime.iso8601>x</dateTime.iso8601>",
        b"<fault>",
        b"&amp;",
        b"&a;",
        b"&#0;",
        b"&#x110000;",
        b"<![CDATA[x]]>",
        b"<!-- c -->",
        b"\xef\xbb\xbf",
    ],
    nest: &[
        (b"<value><array><data>", b"</data></array></value>"),
        (
            b"<value><struct><member><name>a</name>",
            b"</member></struct></value>",
        ),
        (b"<a>", b"</a>"),
    ],
};

/// Protobuf fields: keys of every wire type and lengths.
pub const PROTOBUF: Dialect = Dialect {
    tokens: &[
        b"\x0a\x00",
        b"\x0a\x02\x0a\x00",
        b"\x0a\xff\xff\xff\xff\x0f",
        b"\x12\x00",
        b"\x1a\x05hello",
        b"\x08\x96\x01",
        b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
        b"\x0d\x00\x00\x80\x7f",
        b"\x09\x00\x00\x00\x00\x00\x00\xf0\x7f",
        b"\x0b",
        b"\x0c",
        b"\x0f",
        b"\x00",
        b"\x82\x01\x00",
        b"\xa2\x01\x03\x0a\x01x",
        b"\x8a\x01\x00",
        b"\xfa\xff\xff\xff\x0f\x00",
    ],
    nest: &[(b"\x0a\x80\x80\x04", b""), (b"\x12\x7f", b"")],
};

/// Nothing but mutations of the seeds.
pub const BYTES: Dialect = Dialect {
    tokens: &[],
    nest: &[],
};
