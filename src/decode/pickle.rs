//! A non-executing unpickler for the pickles BitBake sends: the `vars` of its event logs
//! (`bitbake -w`) and the `event.sendpickle` payloads of its live XML-RPC interface.
//!
//! This module owns turning pickle bytes (protocols 2 to 5) into a plain [`Value`] tree,
//! and rendering that tree as JSON ([`to_json`]) in the conventions of the fixture ground
//! truth (`tests/fixtures/bitbake/tools/bbevents.py`: `{"__object__": ..., "attrs": ...}`,
//! `{"__tuple__": [...]}`, ...).
//!
//! Nothing in a pickle is ever resolved to code. A global is a name. Object construction
//! (`NEWOBJ`, `REDUCE` of a class) becomes an [`Object`] (class name, arguments, state)
//! when the class's module is in the [`Allowlist`]; a few well-known reconstructors
//! (`re._compile`, `builtins.set`, `collections.OrderedDict`, `_codecs.encode`,
//! `datetime.datetime`, `copyreg._reconstructor`, ...) become the value they would build;
//! every other call (`os.system`, `builtins.eval`, `subprocess.Popen`, ...) is refused.
//!
//! Memo references stay shared (`Arc`), so a "billion laughs" pickle costs no extra
//! memory, and [`Limits`] bound the input, the nesting depth, the stack, the memo, the
//! container lengths, the decoded items and the size of the tree once its shared parts
//! are expanded. Reference cycles are cut (the back edge becomes [`Value::Recursive`]), so
//! a decoded tree can always be walked and dropped. Every failure is a [`PickleError`]
//! with the byte offset, the opcode and the reason; hostile input never panics.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

// ------------------------------------------------------------------------------------
// Limits, allowlist, errors
// ------------------------------------------------------------------------------------

/// Upper bound on [`Limits::max_depth`]: the final pass and [`to_json`] recurse once per
/// level, so a deeper setting is treated as this one.
pub const DEPTH_CEILING: usize = 1000;

/// Resource limits for one pickle. Every one of them ends decoding with a
/// [`PickleReason::Limit`] error when exceeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Size of the pickle in bytes (after base64 decoding).
    pub max_input_bytes: usize,
    /// Nesting of containers and objects (a list of scalars has depth 1). At most
    /// [`DEPTH_CEILING`].
    pub max_depth: usize,
    /// Entries on the unpickler stack, and separately open MARKs.
    pub max_stack: usize,
    /// Entries in the memo.
    pub max_memo: usize,
    /// Elements of one list, tuple, set or dict (pairs).
    pub max_container_len: usize,
    /// Values decoded in total: every opcode that pushes counts one, and so does every
    /// value a reconstructor copies (`set(list)`, the arguments of a call).
    pub max_items: usize,
    /// Nodes of the tree with every shared reference expanded: what a full walk (such
    /// as [`to_json`]) visits. This is what refuses "billion laughs" pickles.
    pub max_expanded: u64,
    /// Bytes of one `LONG1`/`LONG4` integer.
    pub max_int_bytes: usize,
}

impl Default for Limits {
    /// Generous for real BitBake events: the largest fixture pickle is 10 KB, their
    /// deepest nesting 6; a `DepTreeGenerated` of a large OE build is a few MB at about
    /// 6 bytes per item, and `max_input_bytes` matches the 64 MiB `limits.max_event_bytes`
    /// of the configuration. Memory stays under about 100 bytes per decoded item (under
    /// 1 GB at the extreme of these defaults), time is linear (about 50 MB/s in release
    /// builds).
    fn default() -> Self {
        Limits {
            max_input_bytes: 64 << 20,
            max_depth: 100,
            max_stack: 1 << 18,
            max_memo: 1 << 22,
            max_container_len: 1 << 22,
            max_items: 1 << 23,
            max_expanded: 1 << 25,
            max_int_bytes: 128,
        }
    }
}

/// The modules whose classes may be constructed by default: exactly the modules of the
/// classes found in BitBake's event pickles (`tests/fixtures/bitbake/pickle-opcodes.json`:
/// `bb.event`, `bb.build`, `bb.runqueue`, `bb.command`, `logging.LogRecord`) plus
/// `bb.cooker`, home of `CookerExit`, the event fired when the server shuts down.
/// (`re._compile`, the only other global seen, is a built-in reconstructor.)
pub const DEFAULT_ALLOWED_MODULES: &[&str] = &[
    "bb.event",
    "bb.build",
    "bb.runqueue",
    "bb.command",
    "bb.cooker",
    "logging",
];

/// Modules whose classes may be "constructed", i.e. represented as [`Object`] values.
/// Nothing is ever executed either way; the allowlist keeps the decoded data to the
/// shapes expected from BitBake and makes anything else a clear error.
///
/// An entry matches its module and its submodules: `bb.event` matches the class
/// `bb.event.BuildStarted` and `bb.event.sub.X`, not `bb.eventx.Y`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowlist {
    modules: Vec<String>,
}

impl Allowlist {
    /// An allowlist of the given modules.
    pub fn new<I, S>(modules: I) -> Allowlist
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Allowlist {
            modules: modules.into_iter().map(Into::into).collect(),
        }
    }

    /// No module at all: only the built-in reconstructors are accepted.
    pub fn empty() -> Allowlist {
        Allowlist { modules: vec![] }
    }

    /// The modules, as given.
    pub fn modules(&self) -> &[String] {
        &self.modules
    }

    /// Whether classes of `module` may be constructed.
    pub fn allows_module(&self, module: &str) -> bool {
        self.modules.iter().any(|m| {
            module == m
                || (module.len() > m.len()
                    && module.starts_with(m.as_str())
                    && module.as_bytes()[m.len()] == b'.')
        })
    }
}

impl Default for Allowlist {
    fn default() -> Self {
        Allowlist::new(DEFAULT_ALLOWED_MODULES.iter().copied())
    }
}

/// Why a pickle was not decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PickleReason {
    #[error("empty input")]
    Empty,
    #[error("invalid base64: {0}")]
    Base64(String),
    #[error("input of {size} bytes is over the limit of {limit} bytes")]
    TooLarge { size: u64, limit: u64 },
    #[error("unsupported pickle protocol {0} (only 2 to 5 are decoded)")]
    Protocol(u8),
    #[error("unknown opcode 0x{0:02x}")]
    UnknownOpcode(u8),
    #[error("unsupported opcode: {0}")]
    Unsupported(&'static str),
    #[error("truncated: {0}")]
    Truncated(String),
    #[error("input ended without STOP")]
    Unterminated,
    #[error("length prefix of {len} bytes is larger than the {remaining} bytes left")]
    LengthPrefix { len: u64, remaining: u64 },
    #[error("refused global {name}: {why}")]
    Refused { name: String, why: &'static str },
    #[error("{what} limit of {limit} exceeded")]
    Limit { what: &'static str, limit: u64 },
    #[error("malformed pickle: {0}")]
    Malformed(String),
}

/// A pickle that could not be decoded: where, in which opcode, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PickleError {
    /// Byte offset in the pickle of the opcode that failed (the input length for
    /// [`PickleReason::Unterminated`]; 0 for errors about the input as a whole).
    pub offset: usize,
    /// The opcode that failed, when there is one.
    pub opcode: Option<u8>,
    pub reason: PickleReason,
}

impl fmt::Display for PickleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pickle: byte {}", self.offset)?;
        if let Some(op) = self.opcode {
            match opcode_name(op) {
                Some(name) => write!(f, ", opcode {name} (0x{op:02x})")?,
                None => write!(f, ", opcode 0x{op:02x}")?,
            }
        }
        write!(f, ": {}", self.reason)
    }
}

impl PickleError {
    fn whole(reason: PickleReason) -> PickleError {
        PickleError {
            offset: 0,
            opcode: None,
            reason,
        }
    }
}

// ------------------------------------------------------------------------------------
// Opcodes
// ------------------------------------------------------------------------------------

macro_rules! opcodes {
    ($($name:ident = $byte:literal,)*) => {
        /// Opcode bytes (CPython `Lib/pickle.py`), protocols 0 to 5.
        mod op {
            $(pub const $name: u8 = $byte;)*
        }

        /// The name of a pickle opcode (`"BINUNICODE"`), `None` for unknown bytes.
        pub fn opcode_name(byte: u8) -> Option<&'static str> {
            match byte {
                $($byte => Some(stringify!($name)),)*
                _ => None,
            }
        }
    };
}

opcodes! {
    MARK = b'(', STOP = b'.', POP = b'0', POP_MARK = b'1', DUP = b'2', FLOAT = b'F',
    INT = b'I', BININT = b'J', BININT1 = b'K', LONG = b'L', BININT2 = b'M', NONE = b'N',
    PERSID = b'P', BINPERSID = b'Q', REDUCE = b'R', STRING = b'S', BINSTRING = b'T',
    SHORT_BINSTRING = b'U', UNICODE = b'V', BINUNICODE = b'X', APPEND = b'a',
    BUILD = b'b', GLOBAL = b'c', DICT = b'd', EMPTY_DICT = b'}', APPENDS = b'e',
    GET = b'g', BINGET = b'h', INST = b'i', LONG_BINGET = b'j', LIST = b'l',
    EMPTY_LIST = b']', OBJ = b'o', PUT = b'p', BINPUT = b'q', LONG_BINPUT = b'r',
    SETITEM = b's', TUPLE = b't', EMPTY_TUPLE = b')', SETITEMS = b'u', BINFLOAT = b'G',
    PROTO = 0x80, NEWOBJ = 0x81, EXT1 = 0x82, EXT2 = 0x83, EXT4 = 0x84, TUPLE1 = 0x85,
    TUPLE2 = 0x86, TUPLE3 = 0x87, NEWTRUE = 0x88, NEWFALSE = 0x89, LONG1 = 0x8a,
    LONG4 = 0x8b, BINBYTES = b'B', SHORT_BINBYTES = b'C', SHORT_BINUNICODE = 0x8c,
    BINUNICODE8 = 0x8d, BINBYTES8 = 0x8e, EMPTY_SET = 0x8f, ADDITEMS = 0x90,
    FROZENSET = 0x91, NEWOBJ_EX = 0x92, STACK_GLOBAL = 0x93, MEMOIZE = 0x94, FRAME = 0x95,
    BYTEARRAY8 = 0x96, NEXT_BUFFER = 0x97, READONLY_BUFFER = 0x98,
}

// ------------------------------------------------------------------------------------
// The decoded value tree
// ------------------------------------------------------------------------------------

/// A decoded pickle. Containers are `Arc`s: a memo reference is the same `Arc`, so
/// shared parts are stored once.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer outside `i64`, in decimal.
    BigInt(Arc<str>),
    Float(f64),
    Str(Arc<str>),
    Bytes(Arc<[u8]>),
    ByteArray(Arc<[u8]>),
    List(Arc<[Value]>),
    Tuple(Arc<[Value]>),
    /// Entries in pickle order.
    Dict(Arc<[(Value, Value)]>),
    Set(Arc<[Value]>),
    FrozenSet(Arc<[Value]>),
    Object(Arc<Object>),
    /// A bare global used as data (e.g. a class passed as an argument): a name only.
    Global(Arc<str>),
    /// `re._compile(pattern, flags)`: a compiled regular expression.
    Regex(Arc<Regex>),
    DateTime(Arc<DateTime>),
    Date(Date),
    Time(Arc<Time>),
    TimeDelta(TimeDelta),
    /// A reference back to a container that contains it (a cycle), cut here.
    Recursive,
}

/// An instance of a class, never constructed: what the pickle says about it.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// `module.QualName`, e.g. `bb.build.TaskStarted`.
    pub class: Arc<str>,
    /// Arguments of `NEWOBJ`/`REDUCE` (empty for BitBake's events).
    pub args: Vec<Value>,
    /// Keyword arguments of `NEWOBJ_EX` / `copyreg.__newobj_ex__` (a dict).
    pub kwargs: Option<Value>,
    /// The `BUILD` state: the instance `__dict__`, or `(dict-or-None, slots-dict)`.
    pub state: Option<Value>,
}

/// A compiled regular expression (`re.Pattern`).
#[derive(Debug, Clone, PartialEq)]
pub struct Regex {
    /// A `Str` (or `Bytes`) pattern.
    pub pattern: Value,
    /// `re` flags; 32 (`re.UNICODE`) for every str pattern.
    pub flags: i64,
}

/// `datetime.date`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Date {
    pub year: u16,
    pub month: u8,
    pub day: u8,
}

/// The time-of-day part of `datetime.datetime` and `datetime.time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeOfDay {
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    pub microsecond: u32,
    pub fold: bool,
}

/// `datetime.datetime`; `tzinfo` is usually a `datetime.timezone` [`Object`] whose args
/// are `(offset: TimeDelta[, name: Str])`.
#[derive(Debug, Clone, PartialEq)]
pub struct DateTime {
    pub date: Date,
    pub time: TimeOfDay,
    pub tzinfo: Option<Value>,
}

/// `datetime.time`.
#[derive(Debug, Clone, PartialEq)]
pub struct Time {
    pub time: TimeOfDay,
    pub tzinfo: Option<Value>,
}

/// `datetime.timedelta`, normalized like Python's (`0 <= seconds < 86400`,
/// `0 <= microseconds < 1_000_000`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeDelta {
    pub days: i32,
    pub seconds: u32,
    pub microseconds: u32,
}

impl Value {
    /// A short name of the kind of value, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::ByteArray(_) => "bytearray",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Set(_) => "set",
            Value::FrozenSet(_) => "frozenset",
            Value::Object(_) => "object",
            Value::Global(_) => "global",
            Value::Regex(_) => "re.Pattern",
            Value::DateTime(_) => "datetime",
            Value::Date(_) => "date",
            Value::Time(_) => "time",
            Value::TimeDelta(_) => "timedelta",
            Value::Recursive => "recursive reference",
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// A float, or an int as a float.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(f) => Some(*f),
            Value::Int(i) => Some(*i as f64),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The elements of a list or a tuple.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::List(v) | Value::Tuple(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_dict(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(d) => Some(d),
            _ => None,
        }
    }

    pub fn as_object(&self) -> Option<&Object> {
        match self {
            Value::Object(o) => Some(o),
            _ => None,
        }
    }

    /// The value of a str key of a dict, or of an attribute of an object.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(d) => dict_get(d, key),
            Value::Object(o) => o.attr(key),
            _ => None,
        }
    }
}

/// A dict entry.
type Entry = (Value, Value);

fn dict_get<'v>(d: &'v [Entry], key: &str) -> Option<&'v Value> {
    // The last entry wins, as in a Python dict built by SETITEM(S).
    d.iter()
        .rev()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

impl Object {
    /// The attribute `name` from the state (`__dict__`, then slots).
    pub fn attr(&self, name: &str) -> Option<&Value> {
        let (dict, slots) = self.state_dicts();
        slots
            .and_then(|s| dict_get(s, name))
            .or_else(|| dict.and_then(|d| dict_get(d, name)))
    }

    /// The attributes with str names, in pickle order (`__dict__`, then slots).
    pub fn attrs(&self) -> impl Iterator<Item = (&str, &Value)> {
        let (dict, slots) = self.state_dicts();
        dict.into_iter()
            .flatten()
            .chain(slots.into_iter().flatten())
            .filter_map(|(k, v)| k.as_str().map(|k| (k, v)))
    }

    /// The `__dict__` and the slots dict of the state, where there are.
    fn state_dicts(&self) -> (Option<&[Entry]>, Option<&[Entry]>) {
        match &self.state {
            Some(Value::Dict(d)) => (Some(d), None),
            Some(Value::Tuple(t)) if t.len() == 2 => (t[0].as_dict(), t[1].as_dict()),
            _ => (None, None),
        }
    }
}

// ------------------------------------------------------------------------------------
// Entry points
// ------------------------------------------------------------------------------------

/// A configured unpickler: limits and allowlist.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decoder {
    pub limits: Limits,
    pub allowlist: Allowlist,
}

impl Decoder {
    /// Decodes one pickle.
    pub fn loads(&self, data: &[u8]) -> Result<Value, PickleError> {
        if data.is_empty() {
            return Err(PickleError::whole(PickleReason::Empty));
        }
        if data.len() > self.limits.max_input_bytes {
            return Err(PickleError::whole(PickleReason::TooLarge {
                size: data.len() as u64,
                limit: self.limits.max_input_bytes as u64,
            }));
        }
        let mut m = Machine::new(data, &self.limits, &self.allowlist);
        let root = m.run()?;
        let mut conv = Conv {
            nodes: &m.nodes,
            slots: (0..m.nodes.len()).map(|_| Slot::Todo).collect(),
            max_depth: m.max_depth,
            max_expanded: self.limits.max_expanded,
        };
        match conv.value(&root, 0) {
            Ok((value, _, _)) => Ok(value),
            Err(reason) => Err(m.fail(reason)),
        }
    }

    /// Decodes base64 (whitespace and newlines anywhere are ignored, as in the
    /// `base64.encodebytes` output of BitBake's event log), then the pickle.
    pub fn decode_base64(&self, b64: &str) -> Result<Value, PickleError> {
        let stripped: Vec<u8> = b64.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        if stripped.is_empty() {
            return Err(PickleError::whole(PickleReason::Empty));
        }
        // Refuse before decoding: base64 decodes to at most 3 bytes per 4.
        let at_least = (stripped.len() / 4 * 3).saturating_sub(2);
        if at_least > self.limits.max_input_bytes {
            return Err(PickleError::whole(PickleReason::TooLarge {
                size: at_least as u64,
                limit: self.limits.max_input_bytes as u64,
            }));
        }
        let data = STANDARD
            .decode(&stripped)
            .map_err(|e| PickleError::whole(PickleReason::Base64(e.to_string())))?;
        self.loads(&data)
    }
}

/// Decodes one pickle with the default [`Limits`] and [`Allowlist`].
pub fn loads(data: &[u8]) -> Result<Value, PickleError> {
    Decoder::default().loads(data)
}

/// Decodes the `vars` field of an event-log line (or an `event.sendpickle` payload):
/// strips whitespace and newlines, base64-decodes, unpickles with the defaults.
pub fn decode_event_vars(b64: &str) -> Result<Value, PickleError> {
    Decoder::default().decode_base64(b64)
}

// ------------------------------------------------------------------------------------
// The machine: opcodes to a graph of nodes
// ------------------------------------------------------------------------------------

/// A stack/memo entry. Mutable containers and everything that holds them are nodes in
/// an arena, so memo references, late mutation (`APPENDS` after `MEMOIZE`) and cycles
/// need no reference counting while decoding.
#[derive(Debug, Clone)]
enum V {
    None,
    Bool(bool),
    Int(i64),
    BigInt(Arc<str>),
    Float(f64),
    Str(Arc<str>),
    Bytes(Arc<[u8]>),
    ByteArray(Arc<[u8]>),
    Date(Date),
    TimeDelta(TimeDelta),
    /// Full dotted name and the length of its module part.
    Global(Arc<str>, u32),
    Node(u32),
}

#[derive(Debug)]
struct Node {
    /// Nesting depth as far as known while decoding (exact for the bottom-up order
    /// CPython writes; the final pass checks the real depth).
    depth: u32,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    List(Vec<V>),
    Tuple(Vec<V>),
    Dict(Vec<(V, V)>),
    Set(Vec<V>),
    FrozenSet(Vec<V>),
    // The rest are boxed to keep every node small (40 bytes).
    Object(Box<ObjectNode>),
    /// Pattern and flags.
    Regex(Box<(V, i64)>),
    DateTime(Box<(Date, TimeOfDay, Option<V>)>),
    Time(Box<(TimeOfDay, Option<V>)>),
}

#[derive(Debug)]
struct ObjectNode {
    class: Arc<str>,
    args: Vec<V>,
    kwargs: Option<V>,
    state: Option<V>,
}

impl Kind {
    fn name(&self) -> &'static str {
        match self {
            Kind::List(_) => "list",
            Kind::Tuple(_) => "tuple",
            Kind::Dict(_) => "dict",
            Kind::Set(_) => "set",
            Kind::FrozenSet(_) => "frozenset",
            Kind::Object(_) => "object",
            Kind::Regex(_) => "re.Pattern",
            Kind::DateTime(_) => "datetime",
            Kind::Time(_) => "time",
        }
    }
}

type R<T> = Result<T, PickleError>;

const REFUSED_CALL: &str = "calling it could run code; only the built-in reconstructors and \
     classes of allowlisted modules are accepted";
const REFUSED_CLASS: &str = "not a class of an allowlisted module";

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset and byte of the opcode being executed.
    at: usize,
    op: u8,
    limits: &'a Limits,
    allow: &'a Allowlist,
    max_depth: u32,
    proto: u8,
    stack: Vec<V>,
    marks: Vec<usize>,
    memo: HashMap<u32, V>,
    nodes: Vec<Node>,
    items: usize,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8], limits: &'a Limits, allow: &'a Allowlist) -> Machine<'a> {
        Machine {
            data,
            pos: 0,
            at: 0,
            op: 0,
            limits,
            allow,
            max_depth: limits.max_depth.min(DEPTH_CEILING) as u32,
            proto: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            nodes: Vec::new(),
            items: 0,
        }
    }

    // ---- errors -------------------------------------------------------------------

    fn fail(&self, reason: PickleReason) -> PickleError {
        PickleError {
            offset: self.at,
            opcode: Some(self.op),
            reason,
        }
    }

    fn malformed<T>(&self, msg: impl Into<String>) -> R<T> {
        Err(self.fail(PickleReason::Malformed(msg.into())))
    }

    fn limit<T>(&self, what: &'static str, limit: usize) -> R<T> {
        Err(self.fail(PickleReason::Limit {
            what,
            limit: limit as u64,
        }))
    }

    fn refuse<T>(&self, name: &str, why: &'static str) -> R<T> {
        Err(self.fail(PickleReason::Refused {
            name: name.to_string(),
            why,
        }))
    }

    // ---- reading ------------------------------------------------------------------

    fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        let left = self.remaining();
        if n > left {
            return Err(self.fail(PickleReason::Truncated(format!(
                "needs {n} more bytes, {left} left"
            ))));
        }
        let data: &'a [u8] = self.data;
        let bytes = &data[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    /// `len` bytes announced by a length prefix: checked against the input before
    /// anything is allocated.
    fn take_prefixed(&mut self, len: u64) -> R<&'a [u8]> {
        let left = self.remaining();
        if len > left as u64 {
            return Err(self.fail(PickleReason::LengthPrefix {
                len,
                remaining: left as u64,
            }));
        }
        self.take(len as usize)
    }

    fn array<const N: usize>(&mut self) -> R<[u8; N]> {
        let bytes = self.take(N)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Ok(out)
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.array::<1>()?[0])
    }

    fn line(&mut self) -> R<&'a str> {
        let data: &'a [u8] = self.data;
        let rest = &data[self.pos..];
        let Some(n) = rest.iter().position(|&b| b == b'\n') else {
            return Err(self.fail(PickleReason::Truncated(
                "GLOBAL name without its newline".into(),
            )));
        };
        self.pos += n + 1;
        match std::str::from_utf8(&rest[..n]) {
            Ok(s) => Ok(s),
            Err(_) => self.malformed("GLOBAL name is not UTF-8"),
        }
    }

    fn text(&self, bytes: &[u8]) -> R<Arc<str>> {
        match decode_utf8_surrogatepass(bytes) {
            Some(s) => Ok(s.into()),
            None => self.malformed("string is not valid UTF-8"),
        }
    }

    // ---- stack --------------------------------------------------------------------

    /// Where the current frame starts (everything below the last MARK is hidden).
    fn base(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn push(&mut self, v: V) -> R<()> {
        self.items += 1;
        if self.items > self.limits.max_items {
            return self.limit("decoded items", self.limits.max_items);
        }
        if self.stack.len() >= self.limits.max_stack {
            return self.limit("stack size", self.limits.max_stack);
        }
        self.stack.push(v);
        Ok(())
    }

    fn pop(&mut self) -> R<V> {
        if self.stack.len() <= self.base() {
            return self.malformed("stack underflow");
        }
        match self.stack.pop() {
            Some(v) => Ok(v),
            None => self.malformed("stack underflow"),
        }
    }

    fn top(&self) -> R<&V> {
        if self.stack.len() <= self.base() {
            return self.malformed("stack underflow");
        }
        match self.stack.last() {
            Some(v) => Ok(v),
            None => self.malformed("stack underflow"),
        }
    }

    fn pop_mark(&mut self) -> R<Vec<V>> {
        match self.marks.pop() {
            Some(base) => Ok(self.stack.split_off(base)),
            None => self.malformed("no MARK on the stack"),
        }
    }

    /// The node on top of the stack, the target of APPEND, SETITEM, BUILD, ...
    fn top_node(&self, what: &str) -> R<usize> {
        match self.top()? {
            V::Node(i) => Ok(*i as usize),
            other => self.malformed(format!("{what} target is a {}", v_kind(other))),
        }
    }

    // ---- nodes --------------------------------------------------------------------

    fn depth_of(&self, v: &V) -> u32 {
        match v {
            V::Node(i) => self.nodes.get(*i as usize).map_or(0, |n| n.depth),
            _ => 0,
        }
    }

    fn depth_over<'v>(&self, items: impl IntoIterator<Item = &'v V>) -> u32 {
        1 + items
            .into_iter()
            .map(|v| self.depth_of(v))
            .max()
            .unwrap_or(0)
    }

    fn node(&mut self, kind: Kind, depth: u32) -> R<V> {
        if depth > self.max_depth {
            return self.limit("nesting depth", self.max_depth as usize);
        }
        let Ok(index) = u32::try_from(self.nodes.len()) else {
            return self.limit("decoded items", u32::MAX as usize);
        };
        self.nodes.push(Node { depth, kind });
        Ok(V::Node(index))
    }

    /// A new node from a sequence of children, checked for length and depth.
    fn seq_node(&mut self, items: Vec<V>, make: fn(Vec<V>) -> Kind) -> R<V> {
        self.check_len(items.len())?;
        let depth = self.depth_over(&items);
        self.node(make(items), depth)
    }

    fn check_len(&self, len: usize) -> R<()> {
        if len > self.limits.max_container_len {
            return self.limit("container length", self.limits.max_container_len);
        }
        Ok(())
    }

    /// Node `i` now holds a child of depth `child`.
    fn grow(&mut self, i: usize, child: u32) -> R<()> {
        let depth = self.nodes[i].depth.max(child.saturating_add(1));
        if depth > self.max_depth {
            return self.limit("nesting depth", self.max_depth as usize);
        }
        self.nodes[i].depth = depth;
        Ok(())
    }

    fn check_hashable(&self, v: &V, what: &str) -> R<()> {
        let unhashable = match v {
            V::ByteArray(_) => Some("bytearray"),
            V::Node(i) => match &self.nodes[*i as usize].kind {
                k @ (Kind::List(_) | Kind::Dict(_) | Kind::Set(_)) => Some(k.name()),
                _ => None,
            },
            _ => None,
        };
        match unhashable {
            Some(kind) => self.malformed(format!("unhashable {what} ({kind})")),
            None => Ok(()),
        }
    }

    /// Counts `n` values copied from one container into another (`set(list)`, the
    /// arguments of a call) against [`Limits::max_items`]: a pickle can ask for the same
    /// big list to be copied again and again for one byte each time.
    fn charge(&mut self, n: usize) -> R<()> {
        self.items = self.items.saturating_add(n);
        if self.items > self.limits.max_items {
            return self.limit("decoded items", self.limits.max_items);
        }
        Ok(())
    }

    /// The elements of a tuple node (the arguments of a call).
    fn tuple_items(&mut self, v: &V, what: &str) -> R<Vec<V>> {
        let len = match v {
            V::Node(i) => match &self.nodes[*i as usize].kind {
                Kind::Tuple(items) => Ok(items.len()),
                other => Err(other.name()),
            },
            other => Err(v_kind(other)),
        };
        match len {
            Ok(len) => {
                self.charge(len)?;
                Ok(self.elements(v))
            }
            Err(kind) => self.malformed(format!("{what} arguments are a {kind}")),
        }
    }

    /// The elements of an iterable argument (`set(list)`, `tuple(list)`, ...; the keys
    /// of a dict).
    fn iter_items(&mut self, v: &V, what: &str) -> R<Vec<V>> {
        let len = match v {
            V::Node(i) => match &self.nodes[*i as usize].kind {
                Kind::List(items)
                | Kind::Tuple(items)
                | Kind::Set(items)
                | Kind::FrozenSet(items) => Some(items.len()),
                Kind::Dict(pairs) => Some(pairs.len()),
                _ => None,
            },
            _ => None,
        };
        match len {
            Some(len) => {
                self.charge(len)?;
                Ok(self.elements(v))
            }
            None => self.malformed(format!("{what} of a {}", v_kind_in(v, &self.nodes))),
        }
    }

    /// A copy of the elements of a sequence or set node, or of the keys of a dict node.
    fn elements(&self, v: &V) -> Vec<V> {
        let V::Node(i) = v else { return Vec::new() };
        match &self.nodes[*i as usize].kind {
            Kind::List(items) | Kind::Tuple(items) | Kind::Set(items) | Kind::FrozenSet(items) => {
                items.clone()
            }
            Kind::Dict(pairs) => pairs.iter().map(|(k, _)| k.clone()).collect(),
            _ => Vec::new(),
        }
    }

    fn extend_list(&mut self, items: Vec<V>) -> R<()> {
        let t = self.top_node("APPEND")?;
        self.extend_node(t, items, "APPEND", "list", |k| match k {
            Kind::List(l) => Some(l),
            _ => None,
        })
    }

    fn set_items(&mut self, items: Vec<V>) -> R<()> {
        if !items.len().is_multiple_of(2) {
            return self.malformed("SETITEMS with an odd number of items");
        }
        let t = self.top_node("SETITEM")?;
        for k in items.iter().step_by(2) {
            self.check_hashable(k, "dict key")?;
        }
        let max = self.limits.max_container_len;
        let reason = match &self.nodes[t].kind {
            Kind::Dict(d) if d.len().saturating_add(items.len() / 2) <= max => None,
            Kind::Dict(_) => Some(PickleReason::Limit {
                what: "container length",
                limit: max as u64,
            }),
            other => Some(PickleReason::Malformed(format!(
                "SETITEM target is a {}, not a dict",
                other.name()
            ))),
        };
        if let Some(reason) = reason {
            return Err(self.fail(reason));
        }
        let child = items.iter().map(|v| self.depth_of(v)).max();
        if let Kind::Dict(d) = &mut self.nodes[t].kind {
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                d.push((k, v));
            }
        }
        match child {
            Some(d) => self.grow(t, d),
            None => Ok(()),
        }
    }

    fn add_items(&mut self, items: Vec<V>) -> R<()> {
        let t = self.top_node("ADDITEMS")?;
        for v in &items {
            self.check_hashable(v, "set element")?;
        }
        self.extend_node(t, items, "ADDITEMS", "set", |k| match k {
            Kind::Set(s) => Some(s),
            _ => None,
        })
    }

    /// Appends `items` to container node `t` (the vector `slot` finds in it), within the
    /// container-length limit, and updates the nesting depth.
    fn extend_node(
        &mut self,
        t: usize,
        items: Vec<V>,
        op: &str,
        what: &str,
        slot: fn(&mut Kind) -> Option<&mut Vec<V>>,
    ) -> R<()> {
        let max = self.limits.max_container_len;
        let reason = match slot(&mut self.nodes[t].kind) {
            Some(v) if v.len().saturating_add(items.len()) <= max => None,
            Some(_) => Some(PickleReason::Limit {
                what: "container length",
                limit: max as u64,
            }),
            None => Some(PickleReason::Malformed(format!(
                "{op} target is a {}, not a {what}",
                self.nodes[t].kind.name()
            ))),
        };
        if let Some(reason) = reason {
            return Err(self.fail(reason));
        }
        let child = items.iter().map(|v| self.depth_of(v)).max();
        if let Some(v) = slot(&mut self.nodes[t].kind) {
            v.extend(items);
        }
        match child {
            Some(d) => self.grow(t, d),
            None => Ok(()),
        }
    }

    fn memo_put(&mut self, index: u32) -> R<()> {
        let v = self.top()?.clone();
        if self.memo.len() >= self.limits.max_memo && !self.memo.contains_key(&index) {
            return self.limit("memo size", self.limits.max_memo);
        }
        self.memo.insert(index, v);
        Ok(())
    }

    fn memo_get(&mut self, index: u32) -> R<()> {
        match self.memo.get(&index) {
            Some(v) => {
                let v = v.clone();
                self.push(v)
            }
            None => self.malformed(format!("memo entry {index} is not defined")),
        }
    }

    fn global(&mut self, module: &str, name: &str) -> R<()> {
        // Protocol 2 pickles written by Python 3 use the Python 2 module names
        // (`fix_imports`), as `pickle.Unpickler` maps them back for protocols < 3.
        let module = match module {
            "__builtin__" | "exceptions" if self.proto < 3 => "builtins",
            "copy_reg" if self.proto < 3 => "copyreg",
            m => m,
        };
        let Ok(module_len) = u32::try_from(module.len()) else {
            return self.malformed("module name too long");
        };
        let full: Arc<str> = format!("{module}.{name}").into();
        self.push(V::Global(full, module_len))
    }

    // ---- the loop -----------------------------------------------------------------

    fn run(&mut self) -> R<V> {
        loop {
            if self.pos >= self.data.len() {
                return Err(PickleError {
                    offset: self.data.len(),
                    opcode: None,
                    reason: PickleReason::Unterminated,
                });
            }
            self.at = self.pos;
            self.op = self.data[self.pos];
            self.pos += 1;
            if self.at == 0 && self.op != op::PROTO {
                return self
                    .malformed("does not start with PROTO: not a pickle of protocol 2 or later");
            }
            if let Some(v) = self.step()? {
                return Ok(v);
            }
        }
    }

    /// Executes one opcode; the result at STOP.
    fn step(&mut self) -> R<Option<V>> {
        match self.op {
            op::PROTO => {
                let p = self.u8()?;
                if self.at != 0 {
                    return self.malformed("PROTO after the start of the pickle");
                }
                if !(2..=5).contains(&p) {
                    return Err(self.fail(PickleReason::Protocol(p)));
                }
                self.proto = p;
            }
            op::FRAME => {
                let len = u64::from_le_bytes(self.array()?);
                if len > self.remaining() as u64 {
                    return Err(self.fail(PickleReason::LengthPrefix {
                        len,
                        remaining: self.remaining() as u64,
                    }));
                }
            }
            op::STOP => {
                let v = self.pop()?;
                if !self.stack.is_empty() || !self.marks.is_empty() {
                    return self.malformed(format!(
                        "STOP leaves {} values and {} MARKs on the stack",
                        self.stack.len(),
                        self.marks.len()
                    ));
                }
                if self.pos != self.data.len() {
                    return self
                        .malformed(format!("{} bytes after STOP", self.data.len() - self.pos));
                }
                return Ok(Some(v));
            }
            op::MARK => {
                if self.marks.len() >= self.limits.max_stack {
                    return self.limit("open MARKs", self.limits.max_stack);
                }
                self.marks.push(self.stack.len());
            }
            op::POP => {
                // As in CPython: with nothing above the last MARK, POP drops the MARK.
                if self.stack.len() > self.base() {
                    self.stack.pop();
                } else {
                    self.pop_mark()?;
                }
            }
            op::POP_MARK => {
                self.pop_mark()?;
            }
            op::DUP => {
                let v = self.top()?.clone();
                self.push(v)?;
            }

            // ---- scalars ----
            op::NONE => self.push(V::None)?,
            op::NEWTRUE => self.push(V::Bool(true))?,
            op::NEWFALSE => self.push(V::Bool(false))?,
            op::BININT => {
                let v = i32::from_le_bytes(self.array()?);
                self.push(V::Int(v.into()))?;
            }
            op::BININT1 => {
                let v = self.u8()?;
                self.push(V::Int(v.into()))?;
            }
            op::BININT2 => {
                let v = u16::from_le_bytes(self.array()?);
                self.push(V::Int(v.into()))?;
            }
            op::LONG1 => {
                let n = self.u8()?;
                self.long(n.into())?;
            }
            op::LONG4 => {
                let n = i32::from_le_bytes(self.array()?);
                if n < 0 {
                    return self.malformed("LONG4 with a negative byte count");
                }
                self.long(n as u64)?;
            }
            op::BINFLOAT => {
                let v = f64::from_be_bytes(self.array()?);
                self.push(V::Float(v))?;
            }

            // ---- strings and bytes ----
            op::SHORT_BINUNICODE => {
                let n = self.u8()?;
                self.unicode(n.into())?;
            }
            op::BINUNICODE => {
                let n = u32::from_le_bytes(self.array()?);
                self.unicode(n.into())?;
            }
            op::BINUNICODE8 => {
                let n = u64::from_le_bytes(self.array()?);
                self.unicode(n)?;
            }
            op::SHORT_BINSTRING => {
                let n = self.u8()?;
                self.py2_string(n.into())?;
            }
            op::BINSTRING => {
                let n = i32::from_le_bytes(self.array()?);
                if n < 0 {
                    return self.malformed("BINSTRING with a negative length");
                }
                self.py2_string(n as u64)?;
            }
            op::SHORT_BINBYTES => {
                let n = self.u8()?;
                let b = self.take_prefixed(n.into())?;
                self.push(V::Bytes(b.into()))?;
            }
            op::BINBYTES => {
                let n = u32::from_le_bytes(self.array()?);
                let b = self.take_prefixed(n.into())?;
                self.push(V::Bytes(b.into()))?;
            }
            op::BINBYTES8 => {
                let n = u64::from_le_bytes(self.array()?);
                let b = self.take_prefixed(n)?;
                self.push(V::Bytes(b.into()))?;
            }
            op::BYTEARRAY8 => {
                let n = u64::from_le_bytes(self.array()?);
                let b = self.take_prefixed(n)?;
                self.push(V::ByteArray(b.into()))?;
            }
            op::READONLY_BUFFER => {
                // Only meaningful after NEXT_BUFFER (refused); a no-op on in-band bytes.
                if !matches!(self.top()?, V::Bytes(_) | V::ByteArray(_)) {
                    return self.malformed("READONLY_BUFFER on a value that is not a buffer");
                }
            }

            // ---- containers ----
            op::EMPTY_LIST => {
                let v = self.node(Kind::List(Vec::new()), 1)?;
                self.push(v)?;
            }
            op::EMPTY_TUPLE => {
                let v = self.node(Kind::Tuple(Vec::new()), 1)?;
                self.push(v)?;
            }
            op::EMPTY_DICT => {
                let v = self.node(Kind::Dict(Vec::new()), 1)?;
                self.push(v)?;
            }
            op::EMPTY_SET => {
                let v = self.node(Kind::Set(Vec::new()), 1)?;
                self.push(v)?;
            }
            op::TUPLE => {
                let items = self.pop_mark()?;
                let v = self.seq_node(items, Kind::Tuple)?;
                self.push(v)?;
            }
            op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                let n = usize::from(self.op - op::TUPLE1 + 1);
                if self.stack.len() < self.base() + n {
                    return self.malformed("stack underflow");
                }
                let items = self.stack.split_off(self.stack.len() - n);
                let v = self.seq_node(items, Kind::Tuple)?;
                self.push(v)?;
            }
            op::FROZENSET => {
                let items = self.pop_mark()?;
                for v in &items {
                    self.check_hashable(v, "frozenset element")?;
                }
                let v = self.seq_node(items, Kind::FrozenSet)?;
                self.push(v)?;
            }
            op::APPEND => {
                let v = self.pop()?;
                self.extend_list(vec![v])?;
            }
            op::APPENDS => {
                let items = self.pop_mark()?;
                self.extend_list(items)?;
            }
            op::SETITEM => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![k, v])?;
            }
            op::SETITEMS => {
                let items = self.pop_mark()?;
                self.set_items(items)?;
            }
            op::ADDITEMS => {
                let items = self.pop_mark()?;
                self.add_items(items)?;
            }

            // ---- memo ----
            op::MEMOIZE => {
                let Ok(index) = u32::try_from(self.memo.len()) else {
                    return self.limit("memo size", u32::MAX as usize);
                };
                self.memo_put(index)?;
            }
            op::BINPUT => {
                let i = self.u8()?;
                self.memo_put(i.into())?;
            }
            op::LONG_BINPUT => {
                let i = u32::from_le_bytes(self.array()?);
                self.memo_put(i)?;
            }
            op::BINGET => {
                let i = self.u8()?;
                self.memo_get(i.into())?;
            }
            op::LONG_BINGET => {
                let i = u32::from_le_bytes(self.array()?);
                self.memo_get(i)?;
            }

            // ---- globals and objects ----
            op::GLOBAL => {
                let module = self.line()?;
                let name = self.line()?;
                self.global(module, name)?;
            }
            op::STACK_GLOBAL => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (V::Str(module), V::Str(name)) = (&module, &name) else {
                    return self.malformed(format!(
                        "STACK_GLOBAL of a {} and a {}, not two str",
                        v_kind(&module),
                        v_kind(&name)
                    ));
                };
                self.global(module, name)?;
            }
            op::REDUCE => {
                let args = self.pop()?;
                let func = self.pop()?;
                let v = self.reduce(func, args)?;
                self.push(v)?;
            }
            op::NEWOBJ => {
                let args = self.pop()?;
                let cls = self.pop()?;
                let args = self.tuple_items(&args, "NEWOBJ")?;
                let v = self.new_object(&cls, args, None)?;
                self.push(v)?;
            }
            op::NEWOBJ_EX => {
                let kwargs = self.pop()?;
                let args = self.pop()?;
                let cls = self.pop()?;
                let args = self.tuple_items(&args, "NEWOBJ_EX")?;
                let v = self.new_object(&cls, args, Some(kwargs))?;
                self.push(v)?;
            }
            op::BUILD => {
                let state = self.pop()?;
                self.build(state)?;
            }

            // ---- refused ----
            op::NEXT_BUFFER => {
                return Err(self.fail(PickleReason::Unsupported(
                    "out-of-band buffers (NEXT_BUFFER) are not supported",
                )))
            }
            op::PERSID | op::BINPERSID => {
                return Err(self.fail(PickleReason::Unsupported(
                    "persistent IDs need a persistent_load hook; none is provided",
                )))
            }
            op::EXT1 | op::EXT2 | op::EXT4 => {
                return Err(self.fail(PickleReason::Unsupported(
                    "copyreg extension codes are not supported",
                )))
            }
            op::INT
            | op::LONG
            | op::FLOAT
            | op::STRING
            | op::UNICODE
            | op::GET
            | op::PUT
            | op::LIST
            | op::DICT
            | op::INST
            | op::OBJ => {
                return Err(self.fail(PickleReason::Unsupported(
                    "protocol 0/1 text opcode; only protocols 2 to 5 are decoded",
                )))
            }
            other => return Err(self.fail(PickleReason::UnknownOpcode(other))),
        }
        Ok(None)
    }

    fn long(&mut self, n: u64) -> R<()> {
        if n > self.limits.max_int_bytes as u64 {
            return self.limit("integer size (bytes)", self.limits.max_int_bytes);
        }
        let bytes = self.take_prefixed(n)?;
        self.push(int_from_le(bytes))
    }

    fn unicode(&mut self, n: u64) -> R<()> {
        let bytes = self.take_prefixed(n)?;
        let s = self.text(bytes)?;
        self.push(V::Str(s))
    }

    /// A Python 2 `str` (BINSTRING): text when it is UTF-8, bytes otherwise.
    fn py2_string(&mut self, n: u64) -> R<()> {
        let bytes = self.take_prefixed(n)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => self.push(V::Str(s.into())),
            Err(_) => self.push(V::Bytes(bytes.into())),
        }
    }

    // ---- calls --------------------------------------------------------------------

    fn object_node(&mut self, class: Arc<str>, args: Vec<V>, kwargs: Option<V>) -> R<V> {
        self.check_len(args.len())?;
        let depth = self.depth_over(args.iter().chain(kwargs.as_ref()));
        self.node(
            Kind::Object(Box::new(ObjectNode {
                class,
                args,
                kwargs,
                state: None,
            })),
            depth,
        )
    }

    /// An allowlisted class as an object, never constructed.
    fn new_object(&mut self, cls: &V, args: Vec<V>, kwargs: Option<V>) -> R<V> {
        let V::Global(name, module_len) = cls else {
            return self.malformed(format!("NEWOBJ of a {}, not a class", v_kind(cls)));
        };
        if !self.allow.allows_module(&name[..*module_len as usize]) {
            return self.refuse(name, REFUSED_CLASS);
        }
        if let Some(kw) = &kwargs {
            if !matches!(kw, V::Node(i) if matches!(self.nodes[*i as usize].kind, Kind::Dict(_))) {
                return self.malformed("NEWOBJ_EX keyword arguments are not a dict");
            }
        }
        self.object_node(name.clone(), args, kwargs)
    }

    /// REDUCE: a known reconstructor builds its value; an allowlisted class becomes an
    /// object; anything else is refused.
    fn reduce(&mut self, func: V, args: V) -> R<V> {
        let V::Global(name, module_len) = &func else {
            return self.malformed(format!("REDUCE of a {}, not a global", v_kind(&func)));
        };
        let args = self.tuple_items(&args, "REDUCE")?;
        match &**name {
            "re._compile" => match args.as_slice() {
                [pattern @ (V::Str(_) | V::Bytes(_)), V::Int(flags)] => {
                    let pattern = pattern.clone();
                    self.node(Kind::Regex(Box::new((pattern, *flags))), 1)
                }
                _ => self.bad_args(name),
            },
            "builtins.set" | "builtins.frozenset" | "builtins.list" | "builtins.tuple" => {
                let items = match args.as_slice() {
                    [] => Vec::new(),
                    [it] => self.iter_items(it, name)?,
                    _ => return self.bad_args(name),
                };
                if name.ends_with("set") {
                    for v in &items {
                        self.check_hashable(v, "set element")?;
                    }
                }
                let make = match &**name {
                    "builtins.set" => Kind::Set,
                    "builtins.frozenset" => Kind::FrozenSet,
                    "builtins.list" => Kind::List,
                    _ => Kind::Tuple,
                };
                self.seq_node(items, make)
            }
            "builtins.dict" | "collections.OrderedDict" | "collections.defaultdict" => {
                let pairs = match (&**name, args.as_slice()) {
                    (_, []) => Vec::new(),
                    // defaultdict(default_factory): the factory is a name, dropped.
                    ("collections.defaultdict", [_factory]) => Vec::new(),
                    // OrderedDict([[k, v], ...]) (Python 2 era pickles), dict(pairs).
                    (_, [pairs]) => self.pairs(pairs, name)?,
                    _ => return self.bad_args(name),
                };
                for (k, _) in &pairs {
                    self.check_hashable(k, "dict key")?;
                }
                self.check_len(pairs.len())?;
                let depth = self.depth_over(pairs.iter().flat_map(|(k, v)| [k, v]));
                self.node(Kind::Dict(pairs), depth)
            }
            "builtins.bytes" | "_codecs.encode" | "builtins.bytearray" => {
                let bytes: Arc<[u8]> = match args.as_slice() {
                    [] if &**name != "_codecs.encode" => Arc::from(&[][..]),
                    [V::Bytes(b)] if &**name != "_codecs.encode" => b.clone(),
                    [V::Str(s), V::Str(enc)] => match encode(s, enc) {
                        Some(b) => b.into(),
                        None => {
                            return self
                                .malformed(format!("{name}: cannot encode the text as {enc:?}"))
                        }
                    },
                    [V::Str(s)] if &**name == "_codecs.encode" => s.as_bytes().into(),
                    _ => return self.bad_args(name),
                };
                Ok(if &**name == "builtins.bytearray" {
                    V::ByteArray(bytes)
                } else {
                    V::Bytes(bytes)
                })
            }
            "datetime.datetime" | "datetime.date" | "datetime.time" => self.datetime(name, &args),
            "datetime.timedelta" => match args.as_slice() {
                [V::Int(d), V::Int(s), V::Int(us)] => match timedelta(*d, *s, *us) {
                    Some(td) => Ok(V::TimeDelta(td)),
                    None => self.malformed("timedelta out of range"),
                },
                _ => self.bad_args(name),
            },
            "datetime.timezone" => match args.as_slice() {
                [V::TimeDelta(td)] | [V::TimeDelta(td), V::Str(_)]
                    if td.days == 0
                        || (td.days == -1 && (td.seconds, td.microseconds) != (0, 0)) =>
                {
                    self.object_node(name.clone(), args, None)
                }
                _ => self.bad_args(name),
            },
            "copyreg._reconstructor" => match args.as_slice() {
                [V::Global(cls, cls_module), V::Global(..), state] => {
                    if !self.allow.allows_module(&cls[..*cls_module as usize]) {
                        return self.refuse(cls, REFUSED_CLASS);
                    }
                    let args = match state {
                        V::None => Vec::new(),
                        other => vec![other.clone()],
                    };
                    self.object_node(cls.clone(), args, None)
                }
                _ => self.bad_args(name),
            },
            "copyreg.__newobj__" => match args.split_first() {
                Some((cls, rest)) => self.new_object(cls, rest.to_vec(), None),
                None => self.bad_args(name),
            },
            "copyreg.__newobj_ex__" => match args.as_slice() {
                [cls, a, kw] => {
                    let a = self.tuple_items(a, name)?;
                    self.new_object(cls, a, Some(kw.clone()))
                }
                _ => self.bad_args(name),
            },
            _ if self.allow.allows_module(&name[..*module_len as usize]) => {
                self.object_node(name.clone(), args, None)
            }
            _ => self.refuse(name, REFUSED_CALL),
        }
    }

    fn bad_args<T>(&self, name: &str) -> R<T> {
        self.malformed(format!("unexpected arguments for {name}"))
    }

    /// `[(k, v), ...]` or `[[k, v], ...]`.
    fn pairs(&mut self, v: &V, what: &str) -> R<Vec<(V, V)>> {
        let mut out = Vec::new();
        for item in self.iter_items(v, what)? {
            match self.iter_items(&item, what)?.as_slice() {
                [k, v] => out.push((k.clone(), v.clone())),
                _ => return self.bad_args(what),
            }
        }
        Ok(out)
    }

    fn datetime(&mut self, name: &str, args: &[V]) -> R<V> {
        let (state, tz) = match args {
            [state] => (state, None),
            [state, tz] if name != "datetime.date" => (state, Some(tz)),
            _ => return self.bad_args(name),
        };
        let Some(b) = state_bytes(state) else {
            return self.bad_args(name);
        };
        let tz = match tz {
            None | Some(V::None) => None,
            Some(tz) => Some(tz.clone()),
        };
        let depth = self.depth_over(tz.iter());
        let parsed = match (name, b.len()) {
            ("datetime.datetime", 10) => {
                // The fold bit of a datetime is the top bit of its month byte.
                let fold = b[2] & 0x80 != 0;
                date_from(&[b[0], b[1], b[2] & 0x7F, b[3]])
                    .zip(time_from(&b[4..], false))
                    .map(|(date, time)| {
                        Kind::DateTime(Box::new((date, TimeOfDay { fold, ..time }, tz)))
                    })
            }
            ("datetime.time", 6) => {
                time_from(&b, true).map(|time| Kind::Time(Box::new((time, tz))))
            }
            ("datetime.date", 4) => {
                return match date_from(&b) {
                    Some(d) => Ok(V::Date(d)),
                    None => self.malformed("invalid date"),
                }
            }
            _ => None,
        };
        match parsed {
            Some(kind) => self.node(kind, depth),
            None => self.malformed(format!("invalid {name} state")),
        }
    }

    fn build(&mut self, state: V) -> R<()> {
        let t = self.top_node("BUILD")?;
        let depth = self.depth_of(&state);
        let problem = match &self.nodes[t].kind {
            Kind::Object(o) if o.state.is_none() => None,
            Kind::Object(_) => Some("BUILD of an object that already has a state".into()),
            other => Some(format!("BUILD of a {}, not an object", other.name())),
        };
        if let Some(p) = problem {
            return self.malformed(p);
        }
        if let Kind::Object(o) = &mut self.nodes[t].kind {
            o.state = Some(state);
        }
        self.grow(t, depth)
    }
}

fn v_kind(v: &V) -> &'static str {
    match v {
        V::None => "None",
        V::Bool(_) => "bool",
        V::Int(_) | V::BigInt(_) => "int",
        V::Float(_) => "float",
        V::Str(_) => "str",
        V::Bytes(_) => "bytes",
        V::ByteArray(_) => "bytearray",
        V::Date(_) => "date",
        V::TimeDelta(_) => "timedelta",
        V::Global(..) => "global",
        V::Node(_) => "container",
    }
}

fn v_kind_in(v: &V, nodes: &[Node]) -> &'static str {
    match v {
        V::Node(i) => nodes
            .get(*i as usize)
            .map_or("container", |n| n.kind.name()),
        other => v_kind(other),
    }
}

/// Decodes UTF-8 like Python's `surrogatepass`: an encoded lone surrogate (which a Rust
/// string cannot hold) becomes U+FFFD; anything else invalid is an error (`None`).
fn decode_utf8_surrogatepass(bytes: &[u8]) -> Option<String> {
    let mut out = String::new();
    let mut rest = bytes;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                return Some(out);
            }
            Err(e) => {
                let (good, bad) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(good).ok()?);
                match bad {
                    [0xED, 0xA0..=0xBF, 0x80..=0xBF, ..] => {
                        out.push('\u{FFFD}');
                        rest = &bad[3..];
                    }
                    _ => return None,
                }
            }
        }
    }
}

/// A little-endian two's-complement integer (LONG1/LONG4).
fn int_from_le(bytes: &[u8]) -> V {
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    let fill = if negative { 0xFF } else { 0x00 };
    // Fits in i64 when every byte past the 8th is sign fill and the sign agrees.
    let fits = bytes.len() <= 8
        || (bytes[8..].iter().all(|&b| b == fill) && ((bytes[7] & 0x80 != 0) == negative));
    if fits {
        let mut buf = [fill; 8];
        let n = bytes.len().min(8);
        buf[..n].copy_from_slice(&bytes[..n]);
        return V::Int(i64::from_le_bytes(buf));
    }
    V::BigInt(le_twos_complement_to_decimal(bytes).into())
}

fn le_twos_complement_to_decimal(bytes: &[u8]) -> String {
    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
    let mut magnitude = bytes.to_vec();
    if negative {
        let mut carry = 1u16;
        for b in magnitude.iter_mut() {
            let v = u16::from(!*b) + carry;
            *b = v as u8;
            carry = v >> 8;
        }
    }
    // Most significant 32-bit limb first.
    let mut limbs: Vec<u32> = magnitude
        .chunks(4)
        .rev()
        .map(|c| {
            c.iter()
                .enumerate()
                .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (8 * i)))
        })
        .collect();
    let mut chunks: Vec<u32> = Vec::new(); // base 1e9, least significant first
    let mut start = 0;
    while start < limbs.len() {
        if limbs[start] == 0 {
            start += 1;
            continue;
        }
        let mut rem = 0u64;
        for limb in &mut limbs[start..] {
            let cur = (rem << 32) | u64::from(*limb);
            *limb = (cur / 1_000_000_000) as u32;
            rem = cur % 1_000_000_000;
        }
        chunks.push(rem as u32);
    }
    let mut out = String::new();
    if negative {
        out.push('-');
    }
    match chunks.split_last() {
        None => out.push('0'),
        Some((top, rest)) => {
            out.push_str(&top.to_string());
            for c in rest.iter().rev() {
                out.push_str(&format!("{c:09}"));
            }
        }
    }
    out
}

/// `str.encode(encoding)` for the encodings pickles use for bytes (`latin1`).
fn encode(s: &str, encoding: &str) -> Option<Vec<u8>> {
    let enc: String = encoding
        .chars()
        .filter(|c| *c != '-' && *c != '_')
        .flat_map(char::to_lowercase)
        .collect();
    match enc.as_str() {
        "latin1" | "iso88591" | "l1" => s.chars().map(|c| u8::try_from(c).ok()).collect(),
        "ascii" | "usascii" => s.is_ascii().then(|| s.as_bytes().to_vec()),
        "utf8" => Some(s.as_bytes().to_vec()),
        _ => None,
    }
}

/// The packed state of a `datetime`/`date`/`time`: bytes, or (protocol 2 from Python 2)
/// a latin-1 str.
fn state_bytes(v: &V) -> Option<Vec<u8>> {
    match v {
        V::Bytes(b) => Some(b.to_vec()),
        V::Str(s) => encode(s, "latin1"),
        _ => None,
    }
}

fn days_in_month(year: u16, month: u8) -> u8 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400) => {
            29
        }
        _ => 28,
    }
}

/// `[year_hi, year_lo, month, day]`.
fn date_from(b: &[u8]) -> Option<Date> {
    let [hi, lo, month, day] = <[u8; 4]>::try_from(b).ok()?;
    let year = u16::from(hi) << 8 | u16::from(lo);
    let ok = (1..=9999).contains(&year)
        && (1..=12).contains(&month)
        && day >= 1
        && day <= days_in_month(year, month);
    ok.then_some(Date { year, month, day })
}

/// `[hour, minute, second, us2, us1, us0]`; for a `time`, the fold bit is the top bit of
/// the hour (`fold_in_hour`).
fn time_from(b: &[u8], fold_in_hour: bool) -> Option<TimeOfDay> {
    let [h, minute, second, u2, u1, u0] = <[u8; 6]>::try_from(b).ok()?;
    let (hour, fold) = if fold_in_hour {
        (h & 0x7F, h & 0x80 != 0)
    } else {
        (h, false)
    };
    let microsecond = u32::from(u2) << 16 | u32::from(u1) << 8 | u32::from(u0);
    let ok = hour < 24 && minute < 60 && second < 60 && microsecond < 1_000_000;
    ok.then_some(TimeOfDay {
        hour,
        minute,
        second,
        microsecond,
        fold,
    })
}

fn timedelta(days: i64, seconds: i64, microseconds: i64) -> Option<TimeDelta> {
    const DAY_US: i128 = 86_400_000_000;
    let total =
        i128::from(days) * DAY_US + i128::from(seconds) * 1_000_000 + i128::from(microseconds);
    let d = total.div_euclid(DAY_US);
    let rem = total.rem_euclid(DAY_US);
    if d.abs() > 999_999_999 {
        return None;
    }
    Some(TimeDelta {
        days: d as i32,
        seconds: (rem / 1_000_000) as u32,
        microseconds: (rem % 1_000_000) as u32,
    })
}

// ------------------------------------------------------------------------------------
// The final pass: graph of nodes to a shared, acyclic Value tree
// ------------------------------------------------------------------------------------

enum Slot {
    Todo,
    Busy,
    /// The value, its expanded size and its height.
    Done(Value, u64, u32),
}

struct Conv<'n> {
    nodes: &'n [Node],
    slots: Vec<Slot>,
    max_depth: u32,
    max_expanded: u64,
}

struct Acc {
    size: u64,
    height: u32,
}

impl Conv<'_> {
    /// Converts `v`, reached `path` nodes below the root: the value, its expanded size
    /// (nodes of a full walk) and its height (nesting depth).
    fn value(&mut self, v: &V, path: u32) -> Result<(Value, u64, u32), PickleReason> {
        let i = match v {
            V::Node(i) => *i as usize,
            V::None => return Ok((Value::None, 1, 0)),
            V::Bool(b) => return Ok((Value::Bool(*b), 1, 0)),
            V::Int(n) => return Ok((Value::Int(*n), 1, 0)),
            V::BigInt(s) => return Ok((Value::BigInt(s.clone()), 1, 0)),
            V::Float(f) => return Ok((Value::Float(*f), 1, 0)),
            V::Str(s) => return Ok((Value::Str(s.clone()), 1, 0)),
            V::Bytes(b) => return Ok((Value::Bytes(b.clone()), 1, 0)),
            V::ByteArray(b) => return Ok((Value::ByteArray(b.clone()), 1, 0)),
            V::Date(d) => return Ok((Value::Date(*d), 1, 0)),
            V::TimeDelta(t) => return Ok((Value::TimeDelta(*t), 1, 0)),
            V::Global(name, _) => return Ok((Value::Global(name.clone()), 1, 0)),
        };
        match self.slots.get(i) {
            Some(Slot::Done(value, size, height)) => return Ok((value.clone(), *size, *height)),
            Some(Slot::Busy) => return Ok((Value::Recursive, 1, 0)),
            Some(Slot::Todo) => {}
            None => return Err(PickleReason::Malformed("dangling node".into())),
        }
        // A node at `path` has a height of at least 1, so the root's is over `path`.
        if path >= self.max_depth {
            return Err(self.depth_error());
        }
        self.slots[i] = Slot::Busy;
        let nodes = self.nodes;
        let mut acc = Acc { size: 1, height: 0 };
        let value = match &nodes[i].kind {
            Kind::List(items) => Value::List(self.seq(items, path, &mut acc)?),
            Kind::Tuple(items) => Value::Tuple(self.seq(items, path, &mut acc)?),
            Kind::Set(items) => Value::Set(self.seq(items, path, &mut acc)?),
            Kind::FrozenSet(items) => Value::FrozenSet(self.seq(items, path, &mut acc)?),
            Kind::Dict(pairs) => {
                let mut out = Vec::with_capacity(pairs.len());
                for (k, v) in pairs {
                    let k = self.child(k, path, &mut acc)?;
                    let v = self.child(v, path, &mut acc)?;
                    out.push((k, v));
                }
                Value::Dict(out.into())
            }
            Kind::Object(o) => {
                let args = self.seq(&o.args, path, &mut acc)?.to_vec();
                let kwargs = self.opt(o.kwargs.as_ref(), path, &mut acc)?;
                let state = self.opt(o.state.as_ref(), path, &mut acc)?;
                Value::Object(Arc::new(Object {
                    class: o.class.clone(),
                    args,
                    kwargs,
                    state,
                }))
            }
            Kind::Regex(r) => Value::Regex(Arc::new(Regex {
                pattern: self.child(&r.0, path, &mut acc)?,
                flags: r.1,
            })),
            Kind::DateTime(dt) => Value::DateTime(Arc::new(DateTime {
                date: dt.0,
                time: dt.1,
                tzinfo: self.opt(dt.2.as_ref(), path, &mut acc)?,
            })),
            Kind::Time(t) => Value::Time(Arc::new(Time {
                time: t.0,
                tzinfo: self.opt(t.1.as_ref(), path, &mut acc)?,
            })),
        };
        let height = acc.height + 1;
        if height > self.max_depth {
            return Err(self.depth_error());
        }
        self.slots[i] = Slot::Done(value.clone(), acc.size, height);
        Ok((value, acc.size, height))
    }

    fn depth_error(&self) -> PickleReason {
        PickleReason::Limit {
            what: "nesting depth",
            limit: self.max_depth.into(),
        }
    }

    fn child(&mut self, v: &V, path: u32, acc: &mut Acc) -> Result<Value, PickleReason> {
        let (value, size, height) = self.value(v, path + 1)?;
        acc.size = acc.size.saturating_add(size);
        if acc.size > self.max_expanded {
            return Err(PickleReason::Limit {
                what: "expanded size",
                limit: self.max_expanded,
            });
        }
        acc.height = acc.height.max(height);
        Ok(value)
    }

    fn seq(&mut self, items: &[V], path: u32, acc: &mut Acc) -> Result<Arc<[Value]>, PickleReason> {
        let mut out = Vec::with_capacity(items.len());
        for v in items {
            out.push(self.child(v, path, acc)?);
        }
        Ok(out.into())
    }

    fn opt(
        &mut self,
        v: Option<&V>,
        path: u32,
        acc: &mut Acc,
    ) -> Result<Option<Value>, PickleReason> {
        v.map(|v| self.child(v, path, acc)).transpose()
    }
}

// ------------------------------------------------------------------------------------
// JSON rendering, in the conventions of the fixture ground truth
// ------------------------------------------------------------------------------------

/// Renders a decoded pickle as JSON the way `tests/fixtures/bitbake/tools/bbevents.py`
/// renders the real unpickled objects (`to_jsonable`), which is how the `*.decoded.json`
/// ground truth was written:
///
/// - None/bool/int/float/str as themselves, list as an array;
/// - tuple `{"__tuple__": [...]}`, set `{"__set__": [...]}`, frozenset
///   `{"__frozenset__": [...]}` (elements sorted by their Python repr, as Python does;
///   the repr is reproduced for str/int/float/bool/None/list/dict, approximately for
///   exotic Unicode);
/// - dict with only str keys: an object; any other dict `{"__dict__": [[k, v], ...]}`;
/// - bytes `{"__bytes__": base64}`; bytearray, datetime, date, time and timedelta as
///   `{"__repr__": "<Python repr>"}`;
/// - an object `{"__object__": "module.Class", "attrs": {...}}` from its `__dict__` (and
///   slots); non-empty constructor arguments add `"args"`, keyword arguments `"kwargs"`,
///   and a state that is not a dict `"state"` (Python would show the effect of
///   `__setstate__`, which is not run here);
/// - compiled regex `{"__regex__": pattern, "flags": n}`.
///
/// Beyond the ground truth: a bare global is `{"__global__": "module.name"}` (as in the
/// fixtures' non-executing decoder), an int outside `i64`/`u64` is
/// `{"__int__": "decimal"}` (plain JSON numbers cannot hold it exactly), a NaN or
/// infinite float `{"__float__": "nan" | "inf" | "-inf"}`, a cut cycle
/// `{"__recursive__": true}`.
///
/// The cost is the expanded size of the tree, which [`Limits::max_expanded`] bounds.
pub fn to_json(v: &Value) -> serde_json::Value {
    use serde_json::{json, Value as J};
    match v {
        Value::None => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::Int(i) => J::from(*i),
        Value::BigInt(s) => match s.parse::<u64>() {
            Ok(u) => J::from(u),
            Err(_) => json!({ "__int__": &**s }),
        },
        Value::Float(f) => match serde_json::Number::from_f64(*f) {
            Some(n) => J::Number(n),
            None => json!({ "__float__": py_float_repr(*f) }),
        },
        Value::Str(s) => J::String(s.to_string()),
        Value::Bytes(b) => json!({ "__bytes__": STANDARD.encode(b) }),
        Value::List(items) => J::Array(items.iter().map(to_json).collect()),
        Value::Tuple(items) => {
            json!({ "__tuple__": items.iter().map(to_json).collect::<Vec<_>>() })
        }
        Value::Set(items) => json!({ "__set__": sorted_by_repr(items) }),
        Value::FrozenSet(items) => json!({ "__frozenset__": sorted_by_repr(items) }),
        Value::Dict(pairs) => dict_json(pairs),
        Value::Object(o) => object_json(o),
        Value::Global(name) => json!({ "__global__": &**name }),
        Value::Regex(r) => json!({ "__regex__": to_json(&r.pattern), "flags": r.flags }),
        Value::ByteArray(_)
        | Value::DateTime(_)
        | Value::Date(_)
        | Value::Time(_)
        | Value::TimeDelta(_) => json!({ "__repr__": py_repr(v) }),
        Value::Recursive => json!({ "__recursive__": true }),
    }
}

fn sorted_by_repr(items: &[Value]) -> Vec<serde_json::Value> {
    let mut keyed: Vec<(String, serde_json::Value)> = items
        .iter()
        .map(|v| {
            let j = to_json(v);
            let mut key = String::new();
            py_repr_json(&j, &mut key);
            (key, j)
        })
        .collect();
    keyed.sort_by(|a, b| a.0.cmp(&b.0));
    keyed.into_iter().map(|(_, j)| j).collect()
}

fn dict_json(pairs: &[(Value, Value)]) -> serde_json::Value {
    use serde_json::Value as J;
    if pairs.iter().all(|(k, _)| matches!(k, Value::Str(_))) {
        let mut map = serde_json::Map::new();
        for (k, v) in pairs {
            if let Value::Str(k) = k {
                map.insert(k.to_string(), to_json(v));
            }
        }
        return J::Object(map);
    }
    // A key written twice keeps its first place and its last value, as in Python.
    let mut out: Vec<(J, J)> = Vec::with_capacity(pairs.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (k, v) in pairs {
        let k = to_json(k);
        let v = to_json(v);
        match seen.get(&k.to_string()) {
            Some(&i) => out[i].1 = v,
            None => {
                seen.insert(k.to_string(), out.len());
                out.push((k, v));
            }
        }
    }
    serde_json::json!({
        "__dict__": out.into_iter().map(|(k, v)| J::Array(vec![k, v])).collect::<Vec<_>>()
    })
}

fn object_json(o: &Object) -> serde_json::Value {
    use serde_json::Value as J;
    let mut attrs = serde_json::Map::new();
    let mut add = |d: &[(Value, Value)]| {
        for (k, v) in d {
            let key = match k {
                Value::Str(s) => s.to_string(),
                other => to_json(other).to_string(),
            };
            attrs.insert(key, to_json(v));
        }
    };
    let mut odd_state = None;
    match &o.state {
        None => {}
        Some(Value::Dict(d)) => add(d),
        Some(Value::Tuple(t))
            if t.len() == 2 && t.iter().all(|s| matches!(s, Value::Dict(_) | Value::None)) =>
        {
            for s in t.iter() {
                if let Value::Dict(d) = s {
                    add(d);
                }
            }
        }
        Some(other) => odd_state = Some(to_json(other)),
    }
    let mut out = serde_json::Map::new();
    out.insert("__object__".into(), J::String(o.class.to_string()));
    out.insert("attrs".into(), J::Object(attrs));
    if !o.args.is_empty() {
        out.insert(
            "args".into(),
            J::Array(o.args.iter().map(to_json).collect()),
        );
    }
    if let Some(kw) = &o.kwargs {
        out.insert("kwargs".into(), to_json(kw));
    }
    if let Some(s) = odd_state {
        out.insert("state".into(), s);
    }
    J::Object(out)
}

/// Python's `repr` of the values `to_json` renders as `{"__repr__": ...}`.
fn py_repr(v: &Value) -> String {
    match v {
        Value::ByteArray(b) => format!("bytearray({})", py_bytes_repr(b, true)),
        Value::Bytes(b) => py_bytes_repr(b, false),
        Value::Date(d) => format!("datetime.date({}, {}, {})", d.year, d.month, d.day),
        Value::TimeDelta(td) => timedelta_repr(td),
        Value::DateTime(dt) => {
            let (d, t) = (dt.date, dt.time);
            let mut fields = vec![
                u32::from(d.year),
                d.month.into(),
                d.day.into(),
                t.hour.into(),
                t.minute.into(),
                t.second.into(),
                t.microsecond,
            ];
            for _ in 0..2 {
                if fields.last() == Some(&0) {
                    fields.pop();
                }
            }
            let fields: Vec<String> = fields.iter().map(u32::to_string).collect();
            with_tz_fold(
                format!("datetime.datetime({})", fields.join(", ")),
                dt.tzinfo.as_ref(),
                t.fold,
            )
        }
        Value::Time(tm) => {
            let t = tm.time;
            let tail = if t.microsecond != 0 {
                format!(", {}, {}", t.second, t.microsecond)
            } else if t.second != 0 {
                format!(", {}", t.second)
            } else {
                String::new()
            };
            with_tz_fold(
                format!("datetime.time({}, {}{tail})", t.hour, t.minute),
                tm.tzinfo.as_ref(),
                t.fold,
            )
        }
        Value::Object(o) => tz_repr(o),
        Value::Str(s) => py_str_repr(s),
        Value::Int(i) => i.to_string(),
        Value::BigInt(s) => s.to_string(),
        Value::Float(f) => py_float_repr(*f),
        Value::None => "None".into(),
        Value::Bool(b) => (if *b { "True" } else { "False" }).into(),
        other => format!("<{}>", other.kind()),
    }
}

fn with_tz_fold(mut s: String, tz: Option<&Value>, fold: bool) -> String {
    if let Some(tz) = tz {
        s.pop();
        s.push_str(&format!(", tzinfo={})", py_repr(tz)));
    }
    if fold {
        s.pop();
        s.push_str(", fold=1)");
    }
    s
}

fn tz_repr(o: &Object) -> String {
    if &*o.class == "datetime.timezone" {
        match o.args.as_slice() {
            [Value::TimeDelta(td)] if *td == TimeDelta::default() => {
                return "datetime.timezone.utc".into()
            }
            [Value::TimeDelta(td)] => return format!("datetime.timezone({})", timedelta_repr(td)),
            [Value::TimeDelta(td), name @ Value::Str(_)] => {
                return format!(
                    "datetime.timezone({}, {})",
                    timedelta_repr(td),
                    py_repr(name)
                )
            }
            _ => {}
        }
    }
    format!("<{} object>", o.class)
}

fn timedelta_repr(td: &TimeDelta) -> String {
    let mut args = Vec::new();
    if td.days != 0 {
        args.push(format!("days={}", td.days));
    }
    if td.seconds != 0 {
        args.push(format!("seconds={}", td.seconds));
    }
    if td.microseconds != 0 {
        args.push(format!("microseconds={}", td.microseconds));
    }
    if args.is_empty() {
        args.push("0".into());
    }
    format!("datetime.timedelta({})", args.join(", "))
}

/// `repr(bytes)`, or the bytes part of `repr(bytearray)`, which (a CPython quirk)
/// escapes `'` even inside double quotes.
fn py_bytes_repr(b: &[u8], bytearray: bool) -> String {
    let quote = if b.contains(&b'\'') && !b.contains(&b'"') {
        b'"'
    } else {
        b'\''
    };
    let mut s = String::from("b");
    s.push(quote as char);
    for &c in b {
        match c {
            b'\\' => s.push_str("\\\\"),
            b'\'' if bytearray || quote == b'\'' => s.push_str("\\'"),
            b'"' if quote == b'"' => s.push_str("\\\""),
            b'\t' => s.push_str("\\t"),
            b'\n' => s.push_str("\\n"),
            b'\r' => s.push_str("\\r"),
            0x20..=0x7e => s.push(c as char),
            _ => s.push_str(&format!("\\x{c:02x}")),
        }
    }
    s.push(quote as char);
    s
}

/// `repr(str)`. Which characters Python escapes depends on the Unicode database; this
/// covers controls, C1, a few invisible format characters and separators.
pub(crate) fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if !py_printable(c) => {
                let n = u32::from(c);
                if n < 0x100 {
                    out.push_str(&format!("\\x{n:02x}"));
                } else if n < 0x10000 {
                    out.push_str(&format!("\\u{n:04x}"));
                } else {
                    out.push_str(&format!("\\U{n:08x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

fn py_printable(c: char) -> bool {
    !matches!(u32::from(c),
        0..=0x1f | 0x7f..=0xa0 | 0xad | 0x1680 | 0x2000..=0x200f | 0x2028..=0x202f
        | 0x205f..=0x206f | 0x3000 | 0xd800..=0xf8ff | 0xfeff | 0xfff9..=0xfffb
        | 0xe0000..=0x10ffff)
}

/// `repr(float)`: the shortest round-trip digits, in exponent form below 1e-4 and from
/// 1e16 on.
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return (if f > 0.0 { "inf" } else { "-inf" }).into();
    }
    let sci = format!("{f:e}"); // shortest digits: "-1.2345e-7"
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        if exp >= 0 {
            let e = exp as usize;
            let (int, frac) = if digits.len() > e + 1 {
                (digits[..=e].to_string(), digits[e + 1..].to_string())
            } else {
                (
                    format!("{digits}{}", "0".repeat(e + 1 - digits.len())),
                    "0".to_string(),
                )
            };
            format!("{sign}{int}.{frac}")
        } else {
            let zeros = "0".repeat((-exp - 1) as usize);
            format!("{sign}0.{zeros}{digits}")
        }
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits.clone()
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{m}e{esign}{:02}", exp.abs())
    }
}

/// Python's repr of the JSON-able form (what `bbevents.py` sorts set elements by).
fn py_repr_json(j: &serde_json::Value, out: &mut String) {
    use serde_json::Value as J;
    match j {
        J::Null => out.push_str("None"),
        J::Bool(b) => out.push_str(if *b { "True" } else { "False" }),
        J::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => out.push_str(&i.to_string()),
            (_, Some(u), _) => out.push_str(&u.to_string()),
            (_, _, Some(f)) => out.push_str(&py_float_repr(f)),
            _ => out.push_str(&n.to_string()),
        },
        J::String(s) => out.push_str(&py_str_repr(s)),
        J::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                py_repr_json(item, out);
            }
            out.push(']');
        }
        J::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                out.push_str(&py_str_repr(k));
                out.push_str(": ");
                py_repr_json(v, out);
            }
            out.push('}');
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    use proptest::prelude::*;
    use serde_json::{json, Value as J};

    use super::*;

    fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bitbake")
    }

    /// Where two JSON values differ: numbers must be of the same kind (int or float),
    /// floats equal within 2 ULP (the ground truth went through Python's `repr` and
    /// serde_json's float parser).
    fn json_diff(a: &J, b: &J, path: &str) -> Option<String> {
        match (a, b) {
            (J::Number(x), J::Number(y)) => {
                let same = match (x.as_f64(), y.as_f64()) {
                    _ if x.is_f64() != y.is_f64() => false,
                    (Some(p), Some(q)) if x.is_f64() => {
                        p == q
                            || (p.signum() == q.signum()
                                && (p.to_bits() as i64 - q.to_bits() as i64).abs() <= 2)
                    }
                    _ => x == y,
                };
                (!same).then(|| format!("{path}: {x} != {y}"))
            }
            (J::Array(x), J::Array(y)) => {
                if x.len() != y.len() {
                    return Some(format!("{path}: {} != {} elements", x.len(), y.len()));
                }
                x.iter()
                    .zip(y)
                    .enumerate()
                    .find_map(|(i, (p, q))| json_diff(p, q, &format!("{path}[{i}]")))
            }
            (J::Object(x), J::Object(y)) => {
                let xk: Vec<_> = x.keys().collect();
                let yk: Vec<_> = y.keys().collect();
                if xk != yk {
                    return Some(format!("{path}: keys {xk:?} != {yk:?}"));
                }
                x.iter()
                    .find_map(|(k, v)| json_diff(v, &y[k], &format!("{path}.{k}")))
            }
            _ => (a != b).then(|| format!("{path}: {a} != {b}")),
        }
    }

    /// Decodes every line of `NAME.eventlog` and compares it with `NAME.decoded.json`.
    fn check_log(name: &str, events: usize, lines: usize) {
        let log = std::fs::read_to_string(fixtures().join(format!("{name}.eventlog"))).unwrap();
        let truth =
            std::fs::read_to_string(fixtures().join(format!("{name}.decoded.json"))).unwrap();
        let truth: Vec<J> = truth
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(truth.len(), lines, "{name}: ground-truth lines");
        let mut truth = truth.into_iter();
        let (mut n_events, mut n_lines) = (0, 0);
        for (i, line) in log.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let lineno = i + 1;
            n_lines += 1;
            let rec: J = serde_json::from_str(line).unwrap();
            let gt = truth.next().expect("a ground-truth entry per line");
            assert_eq!(gt["line"], json!(lineno), "{name}: line numbers");
            if let Some(av) = rec.get("allvariables") {
                let av = av.as_object().unwrap();
                assert_eq!(gt["class"], "<allvariables>");
                assert_eq!(gt["attrs"]["variable_count"], json!(av.len()));
                let mut keys: Vec<&String> = av.keys().collect();
                keys.sort();
                let sample: serde_json::Map<String, J> = keys
                    .iter()
                    .take(3)
                    .map(|k| ((*k).clone(), av[k.as_str()].clone()))
                    .collect();
                assert_eq!(gt["attrs"]["sample"], J::Object(sample), "{name}:{lineno}");
                continue;
            }
            n_events += 1;
            let class = rec["class"].as_str().unwrap();
            let value = decode_event_vars(rec["vars"].as_str().unwrap())
                .unwrap_or_else(|e| panic!("{name}:{lineno} ({class}): {e}"));
            let obj = value.as_object().expect("an event is an object");
            assert_eq!(&*obj.class, class, "{name}:{lineno}");
            assert_eq!(gt["class"], class, "{name}:{lineno}");
            let expected = json!({ "__object__": class, "attrs": gt["attrs"] });
            if let Some(d) = json_diff(&to_json(&value), &expected, "") {
                panic!("{name}:{lineno} ({class}) differs from the ground truth at {d}");
            }
        }
        assert_eq!(
            (n_events, n_lines),
            (events, lines),
            "{name}: events, lines"
        );
        assert!(
            truth.next().is_none(),
            "{name}: ground truth has more lines"
        );
    }

    #[test]
    fn success_log_matches_ground_truth() {
        check_log("success", 684, 685);
    }

    #[test]
    fn rebuild_log_matches_ground_truth() {
        check_log("rebuild", 204, 205);
    }

    #[test]
    fn failure_log_matches_ground_truth() {
        check_log("failure", 150, 151);
    }

    #[test]
    fn nothing_provides_log_matches_ground_truth() {
        check_log("nothing-provides", 21, 21);
    }

    #[test]
    fn live_xmlrpc_log_matches_ground_truth() {
        check_log("live-xmlrpc", 686, 687);
    }

    /// Every event pickle of every fixture log.
    fn fixture_pickles() -> &'static [Vec<u8>] {
        static PICKLES: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
        PICKLES.get_or_init(|| {
            let mut out = Vec::new();
            for name in [
                "success",
                "rebuild",
                "failure",
                "nothing-provides",
                "live-xmlrpc",
            ] {
                let log =
                    std::fs::read_to_string(fixtures().join(format!("{name}.eventlog"))).unwrap();
                for line in log.lines().filter(|l| !l.trim().is_empty()) {
                    let rec: J = serde_json::from_str(line).unwrap();
                    if let Some(b64) = rec["vars"].as_str() {
                        let clean: String = b64.split_whitespace().collect();
                        out.push(STANDARD.decode(clean).unwrap());
                    }
                }
            }
            out
        })
    }

    #[test]
    fn fixture_details() {
        let pickles = fixture_pickles();
        assert_eq!(pickles.len(), 684 + 204 + 150 + 21 + 686);
        assert_eq!(pickles.iter().map(Vec::len).max(), Some(10185));
        // The regexes of DepTreeGenerated and a LogRecord with %-args.
        let mut regexes = 0;
        let mut formatted = 0;
        for p in pickles {
            let v = loads(p).unwrap();
            let o = v.as_object().unwrap();
            if &*o.class == "bb.event.DepTreeGenerated" {
                let prios = v.get("_depgraph").unwrap().get("layer-priorities").unwrap();
                for entry in prios.as_seq().unwrap() {
                    // (collection, pattern, compiled pattern, priority)
                    let Value::Regex(r) = &entry.as_seq().unwrap()[2] else {
                        panic!("not a regex: {entry:?}");
                    };
                    assert_eq!(r.flags, 32);
                    assert!(r.pattern.as_str().is_some());
                    regexes += 1;
                }
            }
            if &*o.class == "logging.LogRecord" && o.attr("args").and_then(Value::as_seq).is_some()
            {
                formatted += 1;
            }
        }
        assert!(regexes > 0 && formatted > 0, "{regexes} {formatted}");
        // The deepest nesting, far below the default limit.
        let deepest = pickles
            .iter()
            .map(|p| {
                (1..=Limits::default().max_depth)
                    .find(|&max_depth| {
                        let limits = Limits {
                            max_depth,
                            ..Limits::default()
                        };
                        let d = Decoder {
                            limits,
                            ..Decoder::default()
                        };
                        d.loads(p).is_ok()
                    })
                    .unwrap()
            })
            .max();
        assert_eq!(deepest, Some(6));
    }

    /// Pickles written by CPython 3.11 (`pickle.dumps(x, protocol=N)`) and
    /// `bbevents.to_jsonable(x)` of the same objects.
    #[test]
    fn cpython_vectors_match_to_jsonable() {
        let cases: &[(&str, &[u8], &str)] = &[
            ("p2 set", b"\x80\x02c__builtin__\x0aset\x0aq\x00]q\x01(K\x01X\x01\x00\x00\x00aq\x02e\x85q\x03Rq\x04.", r#"{"__set__": ["a", 1]}"#),
            ("p2 frozenset", b"\x80\x02c__builtin__\x0afrozenset\x0aq\x00]q\x01(X\x01\x00\x00\x00bq\x02X\x01\x00\x00\x00aq\x03e\x85q\x04Rq\x05.", r#"{"__frozenset__": ["a", "b"]}"#),
            ("p2 bytes", b"\x80\x02c_codecs\x0aencode\x0aq\x00X\x05\x00\x00\x00\x00ab\xc3\xbfq\x01X\x06\x00\x00\x00latin1q\x02\x86q\x03Rq\x04.", r#"{"__bytes__": "AGFi/w=="}"#),
            ("p2 empty bytes", b"\x80\x02c__builtin__\x0abytes\x0aq\x00)Rq\x01.", r#"{"__bytes__": ""}"#),
            ("p2 bytearray", b"\x80\x02c__builtin__\x0abytearray\x0aq\x00c_codecs\x0aencode\x0aq\x01X\x06\x00\x00\x00x'y\x0a\xc2\x80q\x02X\x06\x00\x00\x00latin1q\x03\x86q\x04Rq\x05\x85q\x06Rq\x07.", r#"{"__repr__": "bytearray(b\"x\\'y\\n\\x80\")"}"#),
            ("p2 OrderedDict", b"\x80\x02ccollections\x0aOrderedDict\x0aq\x00)Rq\x01(X\x01\x00\x00\x00zq\x02K\x01X\x01\x00\x00\x00aq\x03K\x01K\x02\x86q\x04u.", r#"{"z": 1, "a": {"__tuple__": [1, 2]}}"#),
            ("p2 datetime+tz", b"\x80\x02cdatetime\x0adatetime\x0aq\x00c_codecs\x0aencode\x0aq\x01X\x0b\x00\x00\x00\x07\xc3\xaa\x0b\x15\x0b,\x03\x00\x00xq\x02X\x06\x00\x00\x00latin1q\x03\x86q\x04Rq\x05cdatetime\x0atimezone\x0aq\x06cdatetime\x0atimedelta\x0aq\x07K\x00M\x10\x0eK\x00\x87q\x08Rq\x09X\x03\x00\x00\x00CETq\x0a\x86q\x0bRq\x0c\x86q\x0dRq\x0e.", r#"{"__repr__": "datetime.datetime(2026, 11, 21, 11, 44, 3, 120, tzinfo=datetime.timezone(datetime.timedelta(seconds=3600), 'CET'))"}"#),
            ("p2 datetime utc", b"\x80\x02cdatetime\x0adatetime\x0aq\x00c_codecs\x0aencode\x0aq\x01X\x0b\x00\x00\x00\x07\xc3\xaa\x0b\x15\x0b,\x00\x00\x00\x00q\x02X\x06\x00\x00\x00latin1q\x03\x86q\x04Rq\x05cdatetime\x0atimezone\x0aq\x06cdatetime\x0atimedelta\x0aq\x07K\x00K\x00K\x00\x87q\x08Rq\x09\x85q\x0aRq\x0b\x86q\x0cRq\x0d.", r#"{"__repr__": "datetime.datetime(2026, 11, 21, 11, 44, tzinfo=datetime.timezone.utc)"}"#),
            ("p4 datetime fold", b"\x80\x04\x95*\x00\x00\x00\x00\x00\x00\x00\x8c\x08datetime\x94\x8c\x08datetime\x94\x93\x94C\x0a\x07\xea\x8b\x15\x0b,\x00\x00\x00\x05\x94\x85\x94R\x94.", r#"{"__repr__": "datetime.datetime(2026, 11, 21, 11, 44, 0, 5, fold=1)"}"#),
            ("p2 date", b"\x80\x02cdatetime\x0adate\x0aq\x00c_codecs\x0aencode\x0aq\x01X\x05\x00\x00\x00\x07\xc3\xaa\x01\x02q\x02X\x06\x00\x00\x00latin1q\x03\x86q\x04Rq\x05\x85q\x06Rq\x07.", r#"{"__repr__": "datetime.date(2026, 1, 2)"}"#),
            ("p2 timedelta", b"\x80\x02cdatetime\x0atimedelta\x0aq\x00J\xff\xff\xff\xffK\x05K\x00\x87q\x01Rq\x02.", r#"{"__repr__": "datetime.timedelta(days=-1, seconds=5)"}"#),
            ("p2 time", b"\x80\x02cdatetime\x0atime\x0aq\x00c_codecs\x0aencode\x0aq\x01X\x06\x00\x00\x00\x01\x02\x00\x00\x00\x05q\x02X\x06\x00\x00\x00latin1q\x03\x86q\x04Rq\x05\x85q\x06Rq\x07.", r#"{"__repr__": "datetime.time(1, 2, 0, 5)"}"#),
            // Python writes -2**70 and 10**40 as plain JSON numbers, which serde_json
            // cannot hold exactly: to_json keeps them as decimal strings.
            ("p2 ints and floats", b"\x80\x02]q\x00(\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\xc0\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x80\x00\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80K\xffJ\xff\xff\xff\xffG?\xf8\x00\x00\x00\x00\x00\x00G>\xe4\xf8\xb5\x88\xe3h\xf1GCA\xc3y7\xe0\x80\x00\x8a\x11\x00\x00\x00\x00\x00a\xf5\xb9\xab\xbf\xa4\\\xc3\xf1)c\x1de.", r#"[{"__int__": "18446744073709551616"}, {"__int__": "-1180591620717411303424"}, 9223372036854775808, -9223372036854775808, 255, -1, 1.5, 1e-05, 1e+16, {"__int__": "10000000000000000000000000000000000000000"}]"#),
            ("p2 int keys", b"\x80\x02}q\x00(K\x01X\x01\x00\x00\x00aq\x01K\x02X\x01\x00\x00\x00bq\x02u.", r#"{"__dict__": [[1, "a"], [2, "b"]]}"#),
            ("p3 mixed", b"\x80\x03]q\x00(C\x02abq\x01cbuiltins\x0abytearray\x0aq\x02C\x02cdq\x03\x85q\x04Rq\x05cbuiltins\x0aset\x0aq\x06]q\x07(K\x01K\x02e\x85q\x08Rq\x09e.", r#"[{"__bytes__": "YWI="}, {"__repr__": "bytearray(b'cd')"}, {"__set__": [1, 2]}]"#),
            ("p5 mixed", b"\x80\x05\x95+\x00\x00\x00\x00\x00\x00\x00]\x94(C\x02ab\x94\x96\x02\x00\x00\x00\x00\x00\x00\x00cd\x94\x8f\x94(K\x01K\x02\x90(K\x01K\x02\x86\x94\x8c\x01x\x94\x91\x94e.", r#"[{"__bytes__": "YWI="}, {"__repr__": "bytearray(b'cd')"}, {"__set__": [1, 2]}, {"__frozenset__": ["x", {"__tuple__": [1, 2]}]}]"#),
            ("p4 shared", b"\x80\x04\x95\x12\x00\x00\x00\x00\x00\x00\x00]\x94(]\x94\x8c\x01s\x94ah\x01h\x01\x85\x94e.", r#"[["s"], ["s"], {"__tuple__": [["s"]]}]"#),
            ("p4 unicode", b"\x80\x04\x95&\x00\x00\x00\x00\x00\x00\x00]\x94(\x8c\x0bh\xc3\xa9llo \xf0\x9f\x98\x80\x94}\x94(\x8c\x01k\x94N\x8c\x01t\x94\x88\x8c\x01f\x94\x89ue.", r#"["h\u00e9llo \ud83d\ude00", {"k": null, "t": true, "f": false}]"#),
            ("p4 defaultdict", b"\x80\x04\x95A\x00\x00\x00\x00\x00\x00\x00\x8c\x0bcollections\x94\x8c\x0bdefaultdict\x94\x93\x94\x8c\x08builtins\x94\x8c\x04list\x94\x93\x94\x85\x94R\x94\x8c\x01a\x94]\x94K\x01as.", r#"{"a": [1]}"#),
        ];
        for (name, bytes, expected) in cases {
            let v = loads(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
            let expected: J = serde_json::from_str(expected).unwrap();
            if let Some(d) = json_diff(&to_json(&v), &expected, "") {
                panic!("{name}: {d}\n{}", to_json(&v));
            }
        }
    }

    #[test]
    fn memo_references_stay_shared() {
        let v = loads(b"\x80\x04\x95\x12\x00\x00\x00\x00\x00\x00\x00]\x94(]\x94\x8c\x01s\x94ah\x01h\x01\x85\x94e.").unwrap();
        let outer = v.as_seq().unwrap();
        let (Value::List(a), Value::List(b)) = (&outer[0], &outer[1]) else {
            panic!("{v:?}");
        };
        assert!(Arc::ptr_eq(a, b));
    }

    #[test]
    fn cycles_are_cut() {
        // l = []; l.append(l)
        let v = loads(b"\x80\x04]\x94h\x00a.").unwrap();
        assert_eq!(v, Value::List(vec![Value::Recursive].into()));
        assert_eq!(to_json(&v), json!([{ "__recursive__": true }]));
    }

    #[test]
    fn copyreg_reconstructor_builds_an_allowlisted_object() {
        let p = b"\x80\x02ccopy_reg\n_reconstructor\ncbb.event\nFoo\nc__builtin__\nobject\nN\x87R}X\x03\x00\x00\x00pidK\x07sb.";
        let v = loads(p).unwrap();
        assert_eq!(
            to_json(&v),
            json!({ "__object__": "bb.event.Foo", "attrs": { "pid": 7 } })
        );
        assert_eq!(v.get("pid"), Some(&Value::Int(7)));
        let p = b"\x80\x02ccopy_reg\n_reconstructor\ncos\nFoo\nc__builtin__\nobject\nN\x87R.";
        let e = loads(p).unwrap_err();
        assert!(
            matches!(&e.reason, PickleReason::Refused { name, .. } if name == "os.Foo"),
            "{e}"
        );
    }

    // ---- hostile input --------------------------------------------------------------

    fn refused(p: &[u8]) -> (String, PickleError) {
        let e = loads(p).unwrap_err();
        match &e.reason {
            PickleReason::Refused { name, .. } => (name.clone(), e),
            _ => panic!("not refused: {e}"),
        }
    }

    #[test]
    fn os_system_is_refused() {
        let p = b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00lsq\x01\x85q\x02Rq\x03.";
        let (name, e) = refused(p);
        assert_eq!(name, "os.system");
        assert_eq!((e.offset, e.opcode), (27, Some(op::REDUCE)));
        let msg = e.to_string();
        assert!(
            msg.contains("byte 27") && msg.contains("REDUCE") && msg.contains("os.system"),
            "{msg}"
        );
        // Refused, not run, whatever the protocol or the way the global is named.
        let p4 = b"\x80\x04\x8c\x02os\x94\x8c\x06system\x94\x93\x94\x8c\x02ls\x94\x85\x94R\x94.";
        assert_eq!(refused(p4).0, "os.system");
        // Even an allowlisted module is never executed: it becomes a plain object.
        let d = Decoder {
            allowlist: Allowlist::new(["os"]),
            ..Decoder::default()
        };
        let v = d.loads(p).unwrap();
        assert_eq!(
            to_json(&v),
            json!({ "__object__": "os.system", "attrs": {}, "args": ["ls"] })
        );
    }

    #[test]
    fn eval_and_popen_are_refused() {
        let p = b"\x80\x02cbuiltins\neval\nX\x0a\x00\x00\x00print(123)\x85R.";
        assert_eq!(refused(p).0, "builtins.eval");
        let p = b"\x80\x02c__builtin__\neval\nX\x0a\x00\x00\x00print(123)\x85R.";
        assert_eq!(refused(p).0, "builtins.eval");
        let p = b"\x80\x04\x8c\x0asubprocess\x8c\x05Popen\x93\x8c\x02ls\x85\x81.";
        let (name, e) = refused(p);
        assert_eq!(
            (name.as_str(), e.opcode),
            ("subprocess.Popen", Some(op::NEWOBJ))
        );
        let p = b"\x80\x04\x8c\x0asubprocess\x8c\x05Popen\x93\x8c\x02ls\x85}\x92.";
        assert_eq!(refused(p).0, "subprocess.Popen");
        // A module merely starting like an allowlisted one.
        let p = b"\x80\x04\x8c\x09bb.events\x8c\x01X\x93)\x81.";
        assert_eq!(refused(p).0, "bb.events.X");
        // copyreg.__newobj__ applies the allowlist to its class.
        let p = b"\x80\x02ccopyreg\n__newobj__\ncos\nsystem\n\x85R.";
        assert_eq!(refused(p).0, "os.system");
    }

    /// `depth` levels of lists, each holding `width` references to the level below.
    fn billion_laughs(depth: usize, width: usize) -> Vec<u8> {
        let mut p = b"\x80\x04]\x94(".to_vec();
        for _ in 0..width {
            p.extend_from_slice(b"\x8c\x03lol");
        }
        p.push(b'e');
        for level in 1..=depth {
            p.extend_from_slice(b"0]\x94(");
            for _ in 0..width {
                p.push(b'h');
                p.push((level - 1) as u8);
            }
            p.push(b'e');
        }
        p.push(b'.');
        p
    }

    #[test]
    fn billion_laughs_is_refused_quickly() {
        let p = billion_laughs(12, 10);
        let start = Instant::now();
        let e = loads(&p).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(
            matches!(
                e.reason,
                PickleReason::Limit {
                    what: "expanded size",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.opcode, Some(op::STOP));
        // Without that limit it decodes in no time and no memory: all shared.
        let d = Decoder {
            limits: Limits {
                max_expanded: u64::MAX,
                ..Limits::default()
            },
            ..Decoder::default()
        };
        let v = d.loads(&p).unwrap();
        assert!(start.elapsed() < Duration::from_secs(1));
        let top = v.as_seq().unwrap();
        let (Value::List(a), Value::List(b)) = (&top[0], &top[9]) else {
            panic!()
        };
        assert!(Arc::ptr_eq(a, b));
    }

    #[test]
    fn huge_length_prefix_is_refused_before_allocating() {
        let e = loads(b"\x80\x04X\xf0\xff\xff\xffhello").unwrap_err();
        assert_eq!(
            e,
            PickleError {
                offset: 2,
                opcode: Some(op::BINUNICODE),
                reason: PickleReason::LengthPrefix {
                    len: 0xFFFF_FFF0,
                    remaining: 5
                },
            }
        );
        let e = loads(b"\x80\x04\x8e\xff\xff\xff\xff\xff\xff\xff\xffabc").unwrap_err();
        assert!(matches!(e.reason, PickleReason::LengthPrefix { .. }), "{e}");
        let e = loads(b"\x80\x04\x95\xff\xff\xff\xff\xff\xff\xff\x7f.").unwrap_err();
        assert!(matches!(e.reason, PickleReason::LengthPrefix { .. }), "{e}");
    }

    #[test]
    fn deep_nesting_is_refused() {
        // ((((...[]...),),),) built bottom-up: caught at the TUPLE1 going over.
        let mut p = b"\x80\x04]".to_vec();
        p.extend(std::iter::repeat_n(op::TUPLE1, 500));
        p.push(b'.');
        let e = loads(&p).unwrap_err();
        assert!(
            matches!(
                e.reason,
                PickleReason::Limit {
                    what: "nesting depth",
                    limit: 100
                }
            ),
            "{e}"
        );
        assert_eq!((e.offset, e.opcode), (3 + 99, Some(op::TUPLE1)));
        // Lists nested top-down after being memoized: caught by the final pass.
        let n = 200u32;
        let mut p = b"\x80\x04".to_vec();
        for _ in 0..n {
            p.extend_from_slice(b"]\x94");
        }
        p.extend(std::iter::repeat_n(op::POP, n as usize - 1));
        for i in 0..n - 1 {
            p.push(b'j');
            p.extend_from_slice(&i.to_le_bytes());
            p.push(b'j');
            p.extend_from_slice(&(i + 1).to_le_bytes());
            p.extend_from_slice(b"a0");
        }
        p.push(b'.');
        let e = loads(&p).unwrap_err();
        assert!(
            matches!(
                e.reason,
                PickleReason::Limit {
                    what: "nesting depth",
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.opcode, Some(op::STOP));
        // Within the limit, the same shape decodes.
        let d = Decoder {
            limits: Limits {
                max_depth: 300,
                ..Limits::default()
            },
            ..Decoder::default()
        };
        assert!(d.loads(&p).is_ok());
        // Open MARKs are bounded too.
        let mut p = b"\x80\x04".to_vec();
        p.extend(std::iter::repeat_n(op::MARK, 300_000));
        let e = loads(&p).unwrap_err();
        assert!(
            matches!(
                e.reason,
                PickleReason::Limit {
                    what: "open MARKs",
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn unknown_and_unsupported_opcodes_are_refused() {
        let e = loads(b"\x80\x04\xff.").unwrap_err();
        assert_eq!(
            (e.offset, e.opcode, e.reason.clone()),
            (2, Some(0xff), PickleReason::UnknownOpcode(0xff))
        );
        assert!(e.to_string().contains("unknown opcode 0xff"), "{e}");
        for p in [
            &b"\x80\x02I1\n."[..],
            b"\x80\x02P1\n.",
            b"\x80\x05\x97.",
            b"\x80\x02\x82\x01.",
        ] {
            let e = loads(p).unwrap_err();
            assert!(matches!(e.reason, PickleReason::Unsupported(_)), "{e}");
            assert_eq!(e.offset, 2);
        }
        let e = loads(b"\x80\x06N.").unwrap_err();
        assert_eq!(e.reason, PickleReason::Protocol(6));
        // Protocol 0/1 pickles (no PROTO) are not decoded.
        let e = loads(b"(lp0\nI1\na.").unwrap_err();
        assert!(matches!(e.reason, PickleReason::Malformed(_)), "{e}");
    }

    #[test]
    fn truncated_and_empty_streams_are_errors() {
        let e = loads(b"").unwrap_err();
        assert_eq!((e.offset, e.reason), (0, PickleReason::Empty));
        let e = decode_event_vars("\n \n").unwrap_err();
        assert_eq!(e.reason, PickleReason::Empty);
        let e = loads(b"\x80\x04J\x01\x02").unwrap_err();
        assert_eq!(e.offset, 2);
        assert!(matches!(e.reason, PickleReason::Truncated(_)), "{e}");
        let e = loads(b"\x80\x04N").unwrap_err();
        assert_eq!((e.offset, e.reason), (3, PickleReason::Unterminated));
        let real = &fixture_pickles()[0];
        for cut in 1..real.len() {
            let e = loads(&real[..cut]).unwrap_err();
            assert!(e.offset <= cut, "{e}");
        }
        let e = loads(b"\x80\x04N.N").unwrap_err();
        assert!(matches!(e.reason, PickleReason::Malformed(_)), "{e}");
        let e = decode_event_vars("gASV!!!").unwrap_err();
        assert!(matches!(e.reason, PickleReason::Base64(_)), "{e}");
    }

    #[test]
    fn malformed_streams_are_errors() {
        for p in [
            &b"\x80\x04."[..],                                // STOP on an empty stack
            b"\x80\x04Na.",                                   // APPEND without a target
            b"\x80\x04(N\x85.", // TUPLE1 across a MARK... leaves a MARK
            b"\x80\x04h\x05.",  // undefined memo entry
            b"\x80\x04NNa.",    // APPEND to None
            b"\x80\x04}]Ns.",   // unhashable key
            b"\x80\x04NN\x93.", // STACK_GLOBAL of None
            b"\x80\x04e.",      // APPENDS without a MARK
            b"\x80\x04\x8c\x01a\x8c\x01b\x93Nb.", // BUILD on a global
            b"\x80\x04\x8c\x02re\x8c\x08_compile\x93N\x85R.", // re._compile(None)
        ] {
            let e = loads(p).unwrap_err();
            assert!(matches!(e.reason, PickleReason::Malformed(_)), "{p:?}: {e}");
            assert!(e.offset < p.len());
        }
    }

    #[test]
    fn limits_are_enforced() {
        let small = |f: fn(&mut Limits)| {
            let mut limits = Limits::default();
            f(&mut limits);
            Decoder {
                limits,
                ..Decoder::default()
            }
        };
        let real = &fixture_pickles()[0];
        let e = small(|l| l.max_input_bytes = 10).loads(real).unwrap_err();
        assert!(matches!(e.reason, PickleReason::TooLarge { .. }), "{e}");
        let e = small(|l| l.max_items = 3).loads(real).unwrap_err();
        assert!(
            matches!(
                e.reason,
                PickleReason::Limit {
                    what: "decoded items",
                    ..
                }
            ),
            "{e}"
        );
        let e = small(|l| l.max_memo = 1).loads(real).unwrap_err();
        assert!(
            matches!(
                e.reason,
                PickleReason::Limit {
                    what: "memo size",
                    ..
                }
            ),
            "{e}"
        );
        let e = small(|l| l.max_stack = 2)
            .loads(b"\x80\x04NNN.")
            .unwrap_err();
        assert!(
            matches!(
                e.reason,
                PickleReason::Limit {
                    what: "stack size",
                    ..
                }
            ),
            "{e}"
        );
        let e = small(|l| l.max_container_len = 2)
            .loads(b"\x80\x04](NNNe.")
            .unwrap_err();
        assert!(
            matches!(
                e.reason,
                PickleReason::Limit {
                    what: "container length",
                    ..
                }
            ),
            "{e}"
        );
        let e = small(|l| l.max_int_bytes = 4)
            .loads(b"\x80\x04\x8a\x05\x00\x00\x00\x00\x01.")
            .unwrap_err();
        assert!(matches!(e.reason, PickleReason::Limit { .. }), "{e}");
    }

    #[test]
    fn copying_a_big_list_over_and_over_is_refused() {
        // l = [None] * 100_000, then set(l) a thousand times: 100 M copied values.
        let mut p = b"\x80\x04\x8c\x08builtins\x8c\x03set\x93\x94](".to_vec();
        p.extend(std::iter::repeat_n(op::NONE, 100_000));
        p.extend_from_slice(b"e\x94");
        for _ in 0..1000 {
            p.extend_from_slice(b"h\x00h\x01\x85R0");
        }
        p.push(b'.');
        let start = Instant::now();
        let e = loads(&p).unwrap_err();
        assert!(
            matches!(
                e.reason,
                PickleReason::Limit {
                    what: "decoded items",
                    ..
                }
            ),
            "{e}"
        );
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn python_reprs() {
        assert_eq!(py_float_repr(1e-5), "1e-05");
        assert_eq!(py_float_repr(1e16), "1e+16");
        assert_eq!(py_float_repr(123.0), "123.0");
        assert_eq!(py_float_repr(-0.0), "-0.0");
        assert_eq!(py_float_repr(0.0001), "0.0001");
        assert_eq!(py_float_repr(1234.5678), "1234.5678");
        assert_eq!(py_float_repr(1.5e300), "1.5e+300");
        assert_eq!(py_str_repr("it's"), "\"it's\"");
        assert_eq!(py_str_repr("a\"'\n\u{1}é"), "'a\"\\'\\n\\x01é'");
        assert_eq!(py_bytes_repr(b"a'b", false), "b\"a'b\"");
        assert_eq!(
            le_twos_complement_to_decimal(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0xff]),
            "-9223372036854775808"
        );
    }

    // ---- properties -------------------------------------------------------------------

    fn check_no_panic(data: &[u8]) -> Result<(), TestCaseError> {
        match loads(data) {
            Ok(v) => {
                let _ = to_json(&v);
            }
            Err(e) => {
                prop_assert!(e.offset <= data.len(), "{e}");
                if e.offset == data.len() {
                    prop_assert!(
                        matches!(e.reason, PickleReason::Unterminated | PickleReason::Empty),
                        "{e}"
                    );
                }
                let _ = e.to_string();
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            check_no_panic(&data)?;
        }

        #[test]
        fn arbitrary_opcodes_never_panic(
            proto in 2u8..=5,
            body in proptest::collection::vec(
                prop_oneof![
                    4 => proptest::sample::select(
                        (0u8..=0x98).filter(|b| opcode_name(*b).is_some()).collect::<Vec<_>>()
                    ),
                    1 => any::<u8>(),
                ],
                0..256,
            ),
        ) {
            let mut data = vec![op::PROTO, proto];
            data.extend(body);
            check_no_panic(&data)?;
        }

        #[test]
        fn mutated_fixture_pickles_never_panic(
            pick in any::<prop::sample::Index>(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
        ) {
            let pickles = fixture_pickles();
            let mut data = pickles[pick.index(pickles.len())].clone();
            for (at, byte, kind) in edits {
                if data.is_empty() {
                    break;
                }
                let i = at.index(data.len());
                match kind {
                    0 => data[i] = byte,
                    1 => data.insert(i, byte),
                    2 => {
                        data.remove(i);
                    }
                    _ => data[i] ^= 1 << (byte % 8),
                }
            }
            check_no_panic(&data)?;
        }
    }
}
