//! A small, safe pickle virtual machine for the subset of the protocol that `torch.save`
//! emits (protocol 2 by default; the binary opcodes of protocols 3 to 5 are accepted too).
//!
//! Nothing is executed: a `GLOBAL` becomes a [`Value::Global`] naming the callable, and
//! `REDUCE`/`NEWOBJ` of a callable become a generic [`Value::Object`] recording the callable,
//! its arguments and any state later set by `BUILD`. A few well-known callables are
//! interpreted (`collections.OrderedDict` gives a dict, `builtins.set`/`frozenset` give sets,
//! `_codecs.encode(s, "latin1")` gives bytes, `copyreg._reconstructor` gives an object).
//! Persistent ids (`BINPERSID`) are returned as [`Value::PersistentId`] for the caller to
//! resolve, which is how `torch.save` refers to tensor storages.
//!
//! Values are immutable and shared through [`Rc`], so memo gets and `DUP` are O(1). A
//! container on the stack that is filled after being memoized (the pickler's usual
//! `EMPTY_DICT BINPUT … SETITEMS` pattern) is updated in the memo as well. Every value caches
//! its nesting depth and deeper nesting than [`Limits::max_depth`] is refused, every length
//! field is checked against the bytes that remain before anything is allocated, and the
//! number of operations, the stack, the memo and copy-on-write work are bounded, so any input
//! yields a value or a [`PickleError`]: never a panic, a hang or a huge allocation.

use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

/// Bounds applied while unpickling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deepest nesting of containers accepted.
    pub max_depth: usize,
    /// Most opcodes executed.
    pub max_ops: usize,
    /// Most entries on the value stack (and on the mark stack).
    pub max_stack: usize,
    /// Most memo entries.
    pub max_memo: usize,
    /// Most container elements copied by copy-on-write of shared containers.
    pub max_copy: usize,
    /// Longest `LONG1`/`LONG4` integer in bytes.
    pub max_long_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_depth: 256,
            max_ops: 200_000_000,
            max_stack: 4_000_000,
            max_memo: 16_000_000,
            max_copy: 200_000_000,
            max_long_bytes: 4096,
        }
    }
}

/// Why a pickle stream could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PickleError {
    /// Byte offset of the opcode at fault.
    pub offset: usize,
    /// What is wrong.
    pub reason: String,
}

impl fmt::Display for PickleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pickle error at byte {}: {}", self.offset, self.reason)
    }
}

impl std::error::Error for PickleError {}

/// A value built by the pickle machine.
#[derive(Clone, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer beyond `i64`: little-endian two's complement bytes.
    BigInt(Rc<[u8]>),
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Tuple(Rc<Seq>),
    List(Rc<Seq>),
    Set(Rc<Seq>),
    FrozenSet(Rc<Seq>),
    Dict(Rc<Dict>),
    /// A class or function named by `GLOBAL`/`STACK_GLOBAL`.
    Global(Rc<Global>),
    /// The result of calling (`REDUCE`, `NEWOBJ`) a callable the machine does not interpret.
    Object(Rc<Object>),
    /// A persistent id (`BINPERSID`), left to the caller to resolve.
    PersistentId(Rc<PersistentId>),
}

/// Items of a tuple, list or set.
#[derive(Clone, PartialEq)]
pub struct Seq {
    pub items: Vec<Value>,
    depth: usize,
}

/// A dict in insertion order. A key set twice appears twice; [`Dict::get`] and
/// [`Dict::entries_dedup`] give the last value, as Python would.
#[derive(Clone, PartialEq)]
pub struct Dict {
    pub entries: Vec<(Value, Value)>,
    depth: usize,
}

/// `module.name` of a global.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Global {
    pub module: String,
    pub name: String,
}

/// A call of an uninterpreted callable.
#[derive(Clone, PartialEq)]
pub struct Object {
    /// What was called, usually a [`Value::Global`].
    pub callable: Value,
    /// The positional arguments (a tuple).
    pub args: Value,
    /// Keyword arguments given by `NEWOBJ_EX`.
    pub kwargs: Option<Value>,
    /// State set by `BUILD`.
    pub state: Option<Value>,
    /// Items added by `APPEND`/`APPENDS`/`ADDITEMS` (list-like objects).
    pub items: Vec<Value>,
    /// Entries added by `SETITEM`/`SETITEMS` (dict-like objects).
    pub entries: Vec<(Value, Value)>,
    depth: usize,
}

/// A persistent id.
#[derive(Clone, PartialEq)]
pub struct PersistentId {
    pub pid: Value,
    depth: usize,
}

impl Seq {
    /// Nesting depth (1 for a sequence of scalars).
    pub fn depth(&self) -> usize {
        self.depth
    }
}

impl Dict {
    /// Nesting depth (1 for a dict of scalars).
    pub fn depth(&self) -> usize {
        self.depth
    }

    /// The value of the last entry whose key is the string `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.entries
            .iter()
            .rev()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// Entries in first-insertion order with repeated keys keeping their last value.
    pub fn entries_dedup(&self) -> Vec<(&Value, &Value)> {
        let mut out: Vec<(&Value, &Value)> = Vec::with_capacity(self.entries.len());
        let mut by_str: HashMap<&str, usize> = HashMap::new();
        for (k, v) in &self.entries {
            match k.as_str() {
                Some(s) => match by_str.get(s) {
                    Some(&i) => out[i].1 = v,
                    None => {
                        by_str.insert(s, out.len());
                        out.push((k, v));
                    }
                },
                None => out.push((k, v)),
            }
        }
        out
    }
}

impl Object {
    /// Nesting depth.
    pub fn depth(&self) -> usize {
        self.depth
    }

    fn compute_depth(&self) -> usize {
        let mut d = self.callable.depth().max(self.args.depth());
        for v in self
            .kwargs
            .iter()
            .chain(self.state.iter())
            .chain(&self.items)
        {
            d = d.max(v.depth());
        }
        for (k, v) in &self.entries {
            d = d.max(k.depth()).max(v.depth());
        }
        d + 1
    }
}

impl PersistentId {
    /// Nesting depth.
    pub fn depth(&self) -> usize {
        self.depth
    }
}

impl Global {
    /// Whether this is `module.name`.
    pub fn is(&self, module: &str, name: &str) -> bool {
        self.module == module && self.name == name
    }
}

impl fmt::Display for Global {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.module, self.name)
    }
}

impl fmt::Debug for Global {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Value {
    /// Nesting depth: 0 for scalars, 1 + the deepest child for containers.
    pub fn depth(&self) -> usize {
        match self {
            Value::Tuple(s) | Value::List(s) | Value::Set(s) | Value::FrozenSet(s) => s.depth,
            Value::Dict(d) => d.depth,
            Value::Object(o) => o.depth,
            Value::PersistentId(p) => p.depth,
            _ => 0,
        }
    }

    /// A short name of the variant, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) | Value::BigInt(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Set(_) => "set",
            Value::FrozenSet(_) => "frozenset",
            Value::Dict(_) => "dict",
            Value::Global(_) => "global",
            Value::Object(_) => "object",
            Value::PersistentId(_) => "persistent id",
        }
    }

    /// The string, if this is a `str`.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer, if this is an `int` within `i64` (or a `bool`, as in Python).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// The items, if this is a tuple or a list.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(s) | Value::List(s) => Some(&s.items),
            _ => None,
        }
    }

    /// The dict, if this is one.
    pub fn as_dict(&self) -> Option<&Dict> {
        match self {
            Value::Dict(d) => Some(d),
            _ => None,
        }
    }

    /// The global, if this is one.
    pub fn as_global(&self) -> Option<&Global> {
        match self {
            Value::Global(g) => Some(g),
            _ => None,
        }
    }

    /// The object, if this is one.
    pub fn as_object(&self) -> Option<&Object> {
        match self {
            Value::Object(o) => Some(o),
            _ => None,
        }
    }

    /// Whether this is the global `module.name`.
    pub fn is_global(&self, module: &str, name: &str) -> bool {
        self.as_global().is_some_and(|g| g.is(module, name))
    }

    /// Builds a tuple; fails if it would nest deeper than `max_depth`.
    pub fn tuple(items: Vec<Value>, max_depth: usize) -> Result<Value, String> {
        Ok(Value::Tuple(Rc::new(seq(items, max_depth)?)))
    }

    /// Builds a list; fails if it would nest deeper than `max_depth`.
    pub fn list(items: Vec<Value>, max_depth: usize) -> Result<Value, String> {
        Ok(Value::List(Rc::new(seq(items, max_depth)?)))
    }

    /// Builds a dict; fails if it would nest deeper than `max_depth`.
    pub fn dict(entries: Vec<(Value, Value)>, max_depth: usize) -> Result<Value, String> {
        let depth = entries
            .iter()
            .map(|(k, v)| k.depth().max(v.depth()))
            .max()
            .unwrap_or(0)
            + 1;
        check_depth(depth, max_depth)?;
        Ok(Value::Dict(Rc::new(Dict { entries, depth })))
    }

    /// Builds a string.
    pub fn str(s: &str) -> Value {
        Value::Str(Rc::from(s))
    }

    /// Builds a global `module.name`.
    pub fn global(module: &str, name: &str) -> Value {
        Value::Global(Rc::new(Global {
            module: module.to_owned(),
            name: name.to_owned(),
        }))
    }

    fn ptr_eq(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Tuple(a), Value::Tuple(b))
            | (Value::List(a), Value::List(b))
            | (Value::Set(a), Value::Set(b))
            | (Value::FrozenSet(a), Value::FrozenSet(b)) => Rc::ptr_eq(a, b),
            (Value::Dict(a), Value::Dict(b)) => Rc::ptr_eq(a, b),
            (Value::Object(a), Value::Object(b)) => Rc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Writes a bounded, Python-like rendering (at most `budget` nodes).
    fn render(&self, f: &mut fmt::Formatter<'_>, budget: &mut usize) -> fmt::Result {
        if *budget == 0 {
            return f.write_str("…");
        }
        *budget -= 1;
        match self {
            Value::None => f.write_str("None"),
            Value::Bool(b) => f.write_str(if *b { "True" } else { "False" }),
            Value::Int(i) => write!(f, "{i}"),
            Value::BigInt(b) => write!(f, "<int of {} bytes>", b.len()),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::Str(s) => {
                if s.len() > 200 {
                    write!(f, "'{}…' ({} bytes)", truncate_str(s, 200), s.len())
                } else {
                    write!(f, "{:?}", &**s)
                }
            }
            Value::Bytes(b) => write!(f, "<bytes of length {}>", b.len()),
            Value::Tuple(s) => render_seq(f, "(", ")", &s.items, budget),
            Value::List(s) => render_seq(f, "[", "]", &s.items, budget),
            Value::Set(s) => render_seq(f, "set(", ")", &s.items, budget),
            Value::FrozenSet(s) => render_seq(f, "frozenset(", ")", &s.items, budget),
            Value::Dict(d) => render_entries(f, &d.entries, budget),
            Value::Global(g) => write!(f, "{g}"),
            Value::Object(o) => {
                o.callable.render(f, budget)?;
                o.args.render(f, budget)?;
                if let Some(k) = &o.kwargs {
                    f.write_str("**")?;
                    k.render(f, budget)?;
                }
                if !o.items.is_empty() {
                    f.write_str(" items ")?;
                    render_seq(f, "[", "]", &o.items, budget)?;
                }
                if !o.entries.is_empty() {
                    f.write_str(" entries ")?;
                    render_entries(f, &o.entries, budget)?;
                }
                if let Some(s) = &o.state {
                    f.write_str(" state ")?;
                    s.render(f, budget)?;
                }
                Ok(())
            }
            Value::PersistentId(p) => {
                f.write_str("persistent_id(")?;
                p.pid.render(f, budget)?;
                f.write_str(")")
            }
        }
    }
}

fn truncate_str(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn render_seq(
    f: &mut fmt::Formatter<'_>,
    open: &str,
    close: &str,
    items: &[Value],
    budget: &mut usize,
) -> fmt::Result {
    f.write_str(open)?;
    for (i, v) in items.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        if *budget == 0 {
            f.write_str("…")?;
            break;
        }
        v.render(f, budget)?;
    }
    f.write_str(close)
}

fn render_entries(
    f: &mut fmt::Formatter<'_>,
    entries: &[(Value, Value)],
    budget: &mut usize,
) -> fmt::Result {
    f.write_str("{")?;
    for (i, (k, v)) in entries.iter().enumerate() {
        if i > 0 {
            f.write_str(", ")?;
        }
        if *budget == 0 {
            f.write_str("…")?;
            break;
        }
        k.render(f, budget)?;
        f.write_str(": ")?;
        v.render(f, budget)?;
    }
    f.write_str("}")
}

impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut budget = 256;
        self.render(f, &mut budget)
    }
}

impl fmt::Debug for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut budget = 256;
        render_seq(f, "[", "]", &self.items, &mut budget)
    }
}

impl fmt::Debug for Dict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut budget = 256;
        render_entries(f, &self.entries, &mut budget)
    }
}

impl fmt::Debug for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&Value::Object(Rc::new(self.clone())), f)
    }
}

impl fmt::Debug for PersistentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut budget = 256;
        f.write_str("persistent_id(")?;
        self.pid.render(f, &mut budget)?;
        f.write_str(")")
    }
}

fn check_depth(depth: usize, max_depth: usize) -> Result<(), String> {
    if depth > max_depth {
        Err(format!("values nest deeper than {max_depth} levels"))
    } else {
        Ok(())
    }
}

fn seq(items: Vec<Value>, max_depth: usize) -> Result<Seq, String> {
    let depth = items.iter().map(Value::depth).max().unwrap_or(0) + 1;
    check_depth(depth, max_depth)?;
    Ok(Seq { items, depth })
}

/// Runs the pickle stream `data` with the default [`Limits`] and returns the value it builds.
pub fn unpickle(data: &[u8]) -> Result<Value, PickleError> {
    unpickle_with_limits(data, Limits::default())
}

/// Runs the pickle stream `data` under `limits` and returns the value it builds.
pub fn unpickle_with_limits(data: &[u8], limits: Limits) -> Result<Value, PickleError> {
    let mut m = Machine {
        data,
        pos: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: Memo::default(),
        limits,
        copied: 0,
    };
    let mut ops = 0usize;
    loop {
        let start = m.pos;
        ops += 1;
        if ops > limits.max_ops {
            return Err(PickleError {
                offset: start,
                reason: format!("more than {} operations", limits.max_ops),
            });
        }
        match m.step() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(reason) => {
                return Err(PickleError {
                    offset: start,
                    reason,
                })
            }
        }
    }
}

/// A stack entry: a value and the memo slots that refer to this very value, so that filling
/// a memoized container also updates the memo.
struct Slot {
    value: Value,
    memo: Vec<u32>,
}

impl Slot {
    fn new(value: Value) -> Slot {
        Slot {
            value,
            memo: Vec::new(),
        }
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Slot>,
    marks: Vec<usize>,
    memo: Memo,
    limits: Limits,
    copied: usize,
}

/// The memo: a vector for the dense indices picklers write (0, 1, 2…), a map for others.
#[derive(Default)]
struct Memo {
    dense: Vec<Option<Value>>,
    sparse: HashMap<u32, Value>,
    count: usize,
}

impl Memo {
    fn get(&self, i: u32) -> Option<&Value> {
        match self.dense.get(i as usize) {
            Some(v) => v.as_ref(),
            None if self.sparse.is_empty() => None,
            None => self.sparse.get(&i),
        }
    }

    fn get_mut(&mut self, i: u32) -> Option<&mut Value> {
        match self.dense.get_mut(i as usize) {
            Some(v) => v.as_mut(),
            None if self.sparse.is_empty() => None,
            None => self.sparse.get_mut(&i),
        }
    }

    fn insert(&mut self, i: u32, v: Value) {
        let at = i as usize;
        if let Some(slot) = self.dense.get_mut(at) {
            if slot.is_none() {
                self.count += 1;
            }
            *slot = Some(v);
        } else if at == self.dense.len() {
            if self.sparse.is_empty() || self.sparse.remove(&i).is_none() {
                self.count += 1;
            }
            self.dense.push(Some(v));
            while !self.sparse.is_empty() {
                let Ok(next) = u32::try_from(self.dense.len()) else {
                    break;
                };
                match self.sparse.remove(&next) {
                    Some(v) => self.dense.push(Some(v)),
                    None => break,
                }
            }
        } else if self.sparse.insert(i, v).is_none() {
            self.count += 1;
        }
    }

    fn len(&self) -> usize {
        self.count
    }
}

type Step<T> = Result<T, String>;

mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const BINFLOAT: u8 = b'G';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const BINGET: u8 = b'h';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
}

impl<'a> Machine<'a> {
    fn take(&mut self, n: u64) -> Step<&'a [u8]> {
        let remaining = self.data.len() - self.pos;
        if n > remaining as u64 {
            return Err(format!(
                "needs {n} bytes but only {remaining} remain (truncated stream)"
            ));
        }
        let n = n as usize;
        let data: &'a [u8] = self.data;
        let s = &data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Step<u8> {
        Ok(self.take(1)?[0])
    }

    fn fixed<const N: usize>(&mut self) -> Step<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64)?);
        Ok(a)
    }

    fn line(&mut self) -> Step<String> {
        let rest = &self.data[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| "unterminated GLOBAL name (no newline)".to_owned())?;
        let s = std::str::from_utf8(&rest[..end])
            .map_err(|_| "GLOBAL name is not UTF-8".to_owned())?
            .to_owned();
        self.pos += end + 1;
        Ok(s)
    }

    fn push(&mut self, v: Value) -> Step<()> {
        if self.stack.len() >= self.limits.max_stack {
            return Err(format!(
                "stack grows beyond {} entries",
                self.limits.max_stack
            ));
        }
        self.stack.push(Slot::new(v));
        Ok(())
    }

    fn pop(&mut self) -> Step<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("pops an empty stack (or across a MARK)".to_owned());
        }
        self.stack
            .pop()
            .map(|s| s.value)
            .ok_or_else(|| "pops an empty stack".to_owned())
    }

    fn pop_mark(&mut self) -> Step<Vec<Value>> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| "no MARK on the stack".to_owned())?;
        if mark > self.stack.len() {
            return Err("MARK beyond the stack".to_owned());
        }
        Ok(self.stack.drain(mark..).map(|s| s.value).collect())
    }

    fn memo_put(&mut self, idx: u32) -> Step<()> {
        let slot = self
            .stack
            .last_mut()
            .ok_or_else(|| "memoizes with an empty stack".to_owned())?;
        if self.memo.get(idx).is_none() && self.memo.len() >= self.limits.max_memo {
            return Err(format!(
                "memo grows beyond {} entries",
                self.limits.max_memo
            ));
        }
        self.memo.insert(idx, slot.value.clone());
        if !slot.memo.contains(&idx) {
            slot.memo.push(idx);
        }
        Ok(())
    }

    fn memo_get(&mut self, idx: u32) -> Step<()> {
        let v = self
            .memo
            .get(idx)
            .cloned()
            .ok_or_else(|| format!("memo key {idx} was never stored"))?;
        self.push(v)?;
        if let Some(slot) = self.stack.last_mut() {
            slot.memo.push(idx);
        }
        Ok(())
    }

    /// Mutates the container on top of the stack in place (copying it only if something other
    /// than the memo shares it), then re-points the memo slots that referred to it.
    fn mutate_top(
        &mut self,
        f: impl FnOnce(&mut Value, usize, &mut usize) -> Step<()>,
    ) -> Step<()> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("no container below the items (or across a MARK)".to_owned());
        }
        let Machine {
            stack,
            memo,
            limits,
            copied,
            ..
        } = self;
        let slot = stack
            .last_mut()
            .ok_or_else(|| "no container on the stack".to_owned())?;
        let mut detached = Vec::new();
        for &id in &slot.memo {
            if let Some(v) = memo.get_mut(id) {
                if v.ptr_eq(&slot.value) {
                    *v = Value::None;
                    detached.push(id);
                }
            }
        }
        let result = f(&mut slot.value, limits.max_depth, copied);
        for id in detached {
            memo.insert(id, slot.value.clone());
        }
        slot.memo
            .retain(|&id| memo.get(id).is_some_and(|v| v.ptr_eq(&slot.value)));
        result?;
        if *copied > limits.max_copy {
            return Err(format!(
                "copies more than {} elements of shared containers",
                limits.max_copy
            ));
        }
        Ok(())
    }

    fn step(&mut self) -> Step<Option<Value>> {
        let opcode = self.u8()?;
        match opcode {
            op::PROTO => {
                let v = self.u8()?;
                if v > 5 {
                    return Err(format!("unsupported pickle protocol {v}"));
                }
            }
            op::FRAME => {
                self.take(8)?;
            }
            op::STOP => {
                let v = self.pop()?;
                return Ok(Some(v));
            }
            op::MARK => {
                if self.marks.len() >= self.limits.max_stack {
                    return Err(format!("more than {} MARKs", self.limits.max_stack));
                }
                self.marks.push(self.stack.len());
            }
            op::POP => {
                self.pop()?;
            }
            op::POP_MARK => {
                self.pop_mark()?;
            }
            op::DUP => {
                let floor = self.marks.last().copied().unwrap_or(0);
                if self.stack.len() <= floor {
                    return Err("DUP of an empty stack".to_owned());
                }
                let (value, ids) = match self.stack.last() {
                    Some(s) => (s.value.clone(), s.memo.clone()),
                    None => return Err("DUP of an empty stack".to_owned()),
                };
                self.push(value)?;
                if let Some(s) = self.stack.last_mut() {
                    s.memo = ids;
                }
            }
            op::NONE => self.push(Value::None)?,
            op::NEWTRUE => self.push(Value::Bool(true))?,
            op::NEWFALSE => self.push(Value::Bool(false))?,
            op::BININT => {
                let v = i32::from_le_bytes(self.fixed()?);
                self.push(Value::Int(v as i64))?;
            }
            op::BININT1 => {
                let v = self.u8()?;
                self.push(Value::Int(v as i64))?;
            }
            op::BININT2 => {
                let v = u16::from_le_bytes(self.fixed()?);
                self.push(Value::Int(v as i64))?;
            }
            op::LONG1 => {
                let n = self.u8()? as u64;
                let v = self.long(n)?;
                self.push(v)?;
            }
            op::LONG4 => {
                let n = i32::from_le_bytes(self.fixed()?);
                if n < 0 {
                    return Err("LONG4 with a negative length".to_owned());
                }
                let v = self.long(n as u64)?;
                self.push(v)?;
            }
            op::BINFLOAT => {
                let v = f64::from_be_bytes(self.fixed()?);
                self.push(Value::Float(v))?;
            }
            op::BINUNICODE => {
                let n = u32::from_le_bytes(self.fixed()?) as u64;
                let b = self.take(n)?;
                let v = str_value(b);
                self.push(v)?;
            }
            op::SHORT_BINUNICODE => {
                let n = self.u8()? as u64;
                let b = self.take(n)?;
                let v = str_value(b);
                self.push(v)?;
            }
            op::BINUNICODE8 => {
                let n = u64::from_le_bytes(self.fixed()?);
                let b = self.take(n)?;
                let v = str_value(b);
                self.push(v)?;
            }
            op::BINSTRING => {
                let n = i32::from_le_bytes(self.fixed()?);
                if n < 0 {
                    return Err("BINSTRING with a negative length".to_owned());
                }
                let b = self.take(n as u64)?;
                let s: String = b.iter().map(|&c| c as char).collect();
                self.push(Value::Str(Rc::from(s.as_str())))?;
            }
            op::SHORT_BINSTRING => {
                let n = self.u8()? as u64;
                let b = self.take(n)?;
                let s: String = b.iter().map(|&c| c as char).collect();
                self.push(Value::Str(Rc::from(s.as_str())))?;
            }
            op::BINBYTES => {
                let n = u32::from_le_bytes(self.fixed()?) as u64;
                let b = Rc::from(self.take(n)?);
                self.push(Value::Bytes(b))?;
            }
            op::SHORT_BINBYTES => {
                let n = self.u8()? as u64;
                let b = Rc::from(self.take(n)?);
                self.push(Value::Bytes(b))?;
            }
            op::BINBYTES8 => {
                let n = u64::from_le_bytes(self.fixed()?);
                let b = Rc::from(self.take(n)?);
                self.push(Value::Bytes(b))?;
            }
            op::EMPTY_DICT => self.push(Value::dict(Vec::new(), self.limits.max_depth)?)?,
            op::EMPTY_LIST => self.push(Value::list(Vec::new(), self.limits.max_depth)?)?,
            op::EMPTY_TUPLE => self.push(Value::tuple(Vec::new(), self.limits.max_depth)?)?,
            op::EMPTY_SET => {
                self.push(Value::Set(Rc::new(seq(Vec::new(), self.limits.max_depth)?)))?
            }
            op::DICT => {
                let items = self.pop_mark()?;
                let entries = pairs(items)?;
                self.push(Value::dict(entries, self.limits.max_depth)?)?;
            }
            op::LIST => {
                let items = self.pop_mark()?;
                self.push(Value::list(items, self.limits.max_depth)?)?;
            }
            op::TUPLE => {
                let items = self.pop_mark()?;
                self.push(Value::tuple(items, self.limits.max_depth)?)?;
            }
            op::FROZENSET => {
                let items = self.pop_mark()?;
                let s = seq(items, self.limits.max_depth)?;
                self.push(Value::FrozenSet(Rc::new(s)))?;
            }
            op::TUPLE1 | op::TUPLE2 | op::TUPLE3 => {
                let n = (opcode - op::TUPLE1 + 1) as usize;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.pop()?);
                }
                items.reverse();
                self.push(Value::tuple(items, self.limits.max_depth)?)?;
            }
            op::APPEND => {
                let v = self.pop()?;
                self.mutate_top(|target, max_depth, copied| {
                    extend_items(target, vec![v], max_depth, copied)
                })?;
            }
            op::APPENDS => {
                let items = self.pop_mark()?;
                self.mutate_top(|target, max_depth, copied| {
                    extend_items(target, items, max_depth, copied)
                })?;
            }
            op::ADDITEMS => {
                let items = self.pop_mark()?;
                self.mutate_top(|target, max_depth, copied| {
                    add_set_items(target, items, max_depth, copied)
                })?;
            }
            op::SETITEM => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.mutate_top(|target, max_depth, copied| {
                    extend_entries(target, vec![(k, v)], max_depth, copied)
                })?;
            }
            op::SETITEMS => {
                let items = self.pop_mark()?;
                let entries = pairs(items)?;
                self.mutate_top(|target, max_depth, copied| {
                    extend_entries(target, entries, max_depth, copied)
                })?;
            }
            op::BUILD => {
                let state = self.pop()?;
                self.mutate_top(|target, max_depth, copied| {
                    build(target, state, max_depth, copied)
                })?;
            }
            op::BINPUT => {
                let idx = self.u8()? as u32;
                self.memo_put(idx)?;
            }
            op::LONG_BINPUT => {
                let idx = u32::from_le_bytes(self.fixed()?);
                self.memo_put(idx)?;
            }
            op::MEMOIZE => {
                let idx =
                    u32::try_from(self.memo.len()).map_err(|_| "memo index overflow".to_owned())?;
                self.memo_put(idx)?;
            }
            op::BINGET => {
                let idx = self.u8()? as u32;
                self.memo_get(idx)?;
            }
            op::LONG_BINGET => {
                let idx = u32::from_le_bytes(self.fixed()?);
                self.memo_get(idx)?;
            }
            op::GLOBAL => {
                let module = self.line()?;
                let name = self.line()?;
                self.push(Value::global(&module, &name))?;
            }
            op::STACK_GLOBAL => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (module.as_str(), name.as_str()) {
                    (Some(m), Some(n)) => self.push(Value::global(m, n))?,
                    _ => {
                        return Err(format!(
                            "STACK_GLOBAL needs two strings, found {} and {}",
                            module.kind(),
                            name.kind()
                        ))
                    }
                }
            }
            op::REDUCE => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let v = reduce(callable, args, self.limits.max_depth)?;
                self.push(v)?;
            }
            op::NEWOBJ => {
                let args = self.pop()?;
                let cls = self.pop()?;
                if !matches!(args, Value::Tuple(_)) {
                    return Err(format!(
                        "NEWOBJ arguments are a {}, not a tuple",
                        args.kind()
                    ));
                }
                let v = object(cls, args, None, self.limits.max_depth)?;
                self.push(v)?;
            }
            op::NEWOBJ_EX => {
                let kwargs = self.pop()?;
                let args = self.pop()?;
                let cls = self.pop()?;
                if !matches!(args, Value::Tuple(_)) {
                    return Err(format!(
                        "NEWOBJ_EX arguments are a {}, not a tuple",
                        args.kind()
                    ));
                }
                let v = object(cls, args, Some(kwargs), self.limits.max_depth)?;
                self.push(v)?;
            }
            op::BINPERSID => {
                let pid = self.pop()?;
                let depth = pid.depth() + 1;
                check_depth(depth, self.limits.max_depth)?;
                self.push(Value::PersistentId(Rc::new(PersistentId { pid, depth })))?;
            }
            other => {
                return Err(format!(
                    "unsupported or invalid opcode 0x{other:02x} ({:?})",
                    other as char
                ))
            }
        }
        Ok(None)
    }

    fn long(&mut self, n: u64) -> Step<Value> {
        if n > self.limits.max_long_bytes as u64 {
            return Err(format!(
                "integer of {n} bytes exceeds the limit of {} bytes",
                self.limits.max_long_bytes
            ));
        }
        let b = self.take(n)?;
        Ok(decode_long(b))
    }
}

/// Decodes a little-endian two's complement integer of any length.
fn decode_long(b: &[u8]) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    let negative = b[b.len() - 1] & 0x80 != 0;
    let fill = if negative { 0xff } else { 0x00 };
    // Bytes beyond the eighth must be pure sign extension for the value to fit an i64.
    let fits =
        b.len() <= 8 || (b[8..].iter().all(|&x| x == fill) && ((b[7] & 0x80 != 0) == negative));
    if fits {
        let mut a = [fill; 8];
        let n = b.len().min(8);
        a[..n].copy_from_slice(&b[..n]);
        Value::Int(i64::from_le_bytes(a))
    } else {
        Value::BigInt(Rc::from(b))
    }
}

fn str_value(bytes: &[u8]) -> Value {
    Value::Str(Rc::from(String::from_utf8_lossy(bytes).as_ref()))
}

fn pairs(items: Vec<Value>) -> Step<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        return Err(format!(
            "odd number of items ({}) for dict entries",
            items.len()
        ));
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

/// `Rc::make_mut`, counting the elements copied when the container is shared.
fn make_mut<'a, T: Clone>(
    rc: &'a mut Rc<T>,
    len: impl Fn(&T) -> usize,
    copied: &mut usize,
) -> &'a mut T {
    if Rc::strong_count(rc) > 1 {
        *copied = copied.saturating_add(len(rc) + 1);
    }
    Rc::make_mut(rc)
}

fn extend_items(
    target: &mut Value,
    items: Vec<Value>,
    max_depth: usize,
    copied: &mut usize,
) -> Step<()> {
    let child = items.iter().map(Value::depth).max().unwrap_or(0);
    match target {
        Value::List(s) => {
            check_depth(child + 1, max_depth)?;
            let s = make_mut(s, |s| s.items.len(), copied);
            s.items.extend(items);
            s.depth = s.depth.max(child + 1);
        }
        Value::Object(o) => {
            check_depth(child + 1, max_depth)?;
            let o = make_mut(o, |o| o.items.len() + o.entries.len(), copied);
            o.items.extend(items);
            o.depth = o.depth.max(child + 1);
        }
        other => return Err(format!("APPEND to a {}", other.kind())),
    }
    Ok(())
}

fn add_set_items(
    target: &mut Value,
    items: Vec<Value>,
    max_depth: usize,
    copied: &mut usize,
) -> Step<()> {
    match target {
        Value::Set(s) => {
            let child = items.iter().map(Value::depth).max().unwrap_or(0);
            check_depth(child + 1, max_depth)?;
            let s = make_mut(s, |s| s.items.len(), copied);
            s.items.extend(items);
            s.depth = s.depth.max(child + 1);
            Ok(())
        }
        Value::Object(_) => extend_items(target, items, max_depth, copied),
        other => Err(format!("ADDITEMS to a {}", other.kind())),
    }
}

fn extend_entries(
    target: &mut Value,
    entries: Vec<(Value, Value)>,
    max_depth: usize,
    copied: &mut usize,
) -> Step<()> {
    let child = entries
        .iter()
        .map(|(k, v)| k.depth().max(v.depth()))
        .max()
        .unwrap_or(0);
    check_depth(child + 1, max_depth)?;
    match target {
        Value::Dict(d) => {
            let d = make_mut(d, |d| d.entries.len(), copied);
            d.entries.extend(entries);
            d.depth = d.depth.max(child + 1);
        }
        Value::Object(o) => {
            let o = make_mut(o, |o| o.items.len() + o.entries.len(), copied);
            o.entries.extend(entries);
            o.depth = o.depth.max(child + 1);
        }
        other => return Err(format!("SETITEM on a {}", other.kind())),
    }
    Ok(())
}

fn build(target: &mut Value, state: Value, max_depth: usize, copied: &mut usize) -> Step<()> {
    match target {
        Value::Object(o) => {
            check_depth(state.depth() + 1, max_depth)?;
            let o = make_mut(o, |o| o.items.len() + o.entries.len(), copied);
            o.state = Some(state);
            o.depth = o.compute_depth();
            Ok(())
        }
        // Attributes of dict and list subclasses (such as the `_metadata` of a PyTorch state
        // dict) carry nothing we use.
        Value::Dict(_) | Value::List(_) => Ok(()),
        other => Err(format!("BUILD on a {}", other.kind())),
    }
}

fn object(callable: Value, args: Value, kwargs: Option<Value>, max_depth: usize) -> Step<Value> {
    let mut o = Object {
        callable,
        args,
        kwargs,
        state: None,
        items: Vec::new(),
        entries: Vec::new(),
        depth: 0,
    };
    o.depth = o.compute_depth();
    check_depth(o.depth, max_depth)?;
    Ok(Value::Object(Rc::new(o)))
}

/// `callable(*args)`: interprets a few builtins, records any other call as an [`Object`].
fn reduce(callable: Value, args: Value, max_depth: usize) -> Step<Value> {
    let items = match &args {
        Value::Tuple(t) => &t.items,
        other => {
            return Err(format!(
                "REDUCE arguments are a {}, not a tuple",
                other.kind()
            ))
        }
    };
    if let Value::Global(g) = &callable {
        let module = g.module.as_str();
        let name = g.name.as_str();
        let builtin = matches!(module, "builtins" | "__builtin__");
        match (module, name) {
            ("collections", "OrderedDict") | ("builtins" | "__builtin__", "dict") => {
                match items.as_slice() {
                    [] => return Value::dict(Vec::new(), max_depth),
                    [Value::List(s)] | [Value::Tuple(s)] => {
                        let mut entries = Vec::with_capacity(s.items.len());
                        for item in &s.items {
                            match item.as_seq() {
                                Some([k, v]) => entries.push((k.clone(), v.clone())),
                                _ => return Err(format!("{g} given an item that is not a pair")),
                            }
                        }
                        return Value::dict(entries, max_depth);
                    }
                    [Value::Dict(d)] => return Ok(Value::Dict(d.clone())),
                    _ => {}
                }
            }
            (_, "set" | "frozenset") if builtin => {
                let set_items = match items.as_slice() {
                    [] => Some(Vec::new()),
                    [Value::List(s) | Value::Tuple(s) | Value::Set(s) | Value::FrozenSet(s)] => {
                        Some(s.items.clone())
                    }
                    _ => None,
                };
                if let Some(set_items) = set_items {
                    let s = Rc::new(seq(set_items, max_depth)?);
                    return Ok(if name == "set" {
                        Value::Set(s)
                    } else {
                        Value::FrozenSet(s)
                    });
                }
            }
            ("_codecs", "encode") => {
                if let [Value::Str(s), Value::Str(enc)] = items.as_slice() {
                    if matches!(&**enc, "latin1" | "latin-1" | "iso-8859-1") {
                        let bytes: Option<Vec<u8>> =
                            s.chars().map(|c| u8::try_from(u32::from(c)).ok()).collect();
                        if let Some(bytes) = bytes {
                            return Ok(Value::Bytes(Rc::from(bytes)));
                        }
                    }
                }
            }
            ("copyreg" | "copy_reg", "_reconstructor") => {
                if let [cls, _base, _state] = items.as_slice() {
                    let empty = Value::tuple(Vec::new(), max_depth)?;
                    return object(cls.clone(), empty, None, max_depth);
                }
            }
            _ => {}
        }
    }
    object(callable, args, None, max_depth)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A tiny assembler for test streams.
    #[derive(Default)]
    struct P(Vec<u8>);

    impl P {
        fn new() -> P {
            P(vec![op::PROTO, 2])
        }
        fn op(mut self, o: u8) -> P {
            self.0.push(o);
            self
        }
        fn int(mut self, v: u8) -> P {
            self.0.extend([op::BININT1, v]);
            self
        }
        fn s(mut self, s: &str) -> P {
            self.0.push(op::SHORT_BINUNICODE);
            self.0.push(s.len() as u8);
            self.0.extend(s.as_bytes());
            self
        }
        fn put(mut self, i: u8) -> P {
            self.0.extend([op::BINPUT, i]);
            self
        }
        fn get(mut self, i: u8) -> P {
            self.0.extend([op::BINGET, i]);
            self
        }
        fn global(mut self, m: &str, n: &str) -> P {
            self.0.push(op::GLOBAL);
            self.0.extend(format!("{m}\n{n}\n").as_bytes());
            self
        }
        fn stop(mut self) -> Vec<u8> {
            self.0.push(op::STOP);
            self.0
        }
    }

    fn ints(v: &Value) -> Vec<i64> {
        v.as_seq()
            .unwrap()
            .iter()
            .map(|x| x.as_int().unwrap())
            .collect()
    }

    #[test]
    fn scalars() {
        let mut b = vec![op::PROTO, 2, op::MARK, op::NONE, op::NEWTRUE, op::NEWFALSE];
        b.extend([op::BININT]);
        b.extend((-5i32).to_le_bytes());
        b.extend([op::BININT2, 0x34, 0x12]);
        b.push(op::BINFLOAT);
        b.extend(1.5f64.to_be_bytes());
        b.extend([op::LONG1, 2, 0xff, 0x7f]);
        b.extend([op::LONG1, 1, 0xff]);
        b.extend([op::LONG1, 9, 0, 0, 0, 0, 0, 0, 0, 0x80, 0]);
        b.extend([op::SHORT_BINBYTES, 2, 1, 2]);
        b.extend([op::SHORT_BINSTRING, 1, b'x']);
        b.extend([op::TUPLE, op::STOP]);
        let v = unpickle(&b).unwrap();
        let items = v.as_seq().unwrap();
        assert_eq!(items[0], Value::None);
        assert_eq!(items[1], Value::Bool(true));
        assert_eq!(items[2], Value::Bool(false));
        assert_eq!(items[3], Value::Int(-5));
        assert_eq!(items[4], Value::Int(0x1234));
        assert_eq!(items[5], Value::Float(1.5));
        assert_eq!(items[6], Value::Int(0x7fff));
        assert_eq!(items[7], Value::Int(-1));
        assert!(matches!(&items[8], Value::BigInt(b) if b.len() == 9));
        assert_eq!(items[9], Value::Bytes(Rc::from(&[1u8, 2][..])));
        assert_eq!(items[10], Value::str("x"));
    }

    #[test]
    fn long_decoding_edges() {
        assert_eq!(decode_long(&[]), Value::Int(0));
        assert_eq!(decode_long(&i64::MIN.to_le_bytes()), Value::Int(i64::MIN));
        let mut b = i64::MIN.to_le_bytes().to_vec();
        b.push(0xff);
        assert_eq!(decode_long(&b), Value::Int(i64::MIN));
        let mut b = i64::MAX.to_le_bytes().to_vec();
        b.push(0x00);
        assert_eq!(decode_long(&b), Value::Int(i64::MAX));
        // 2^63 needs nine bytes.
        let mut b = 0x8000_0000_0000_0000u64.to_le_bytes().to_vec();
        b.push(0);
        assert!(matches!(decode_long(&b), Value::BigInt(_)));
    }

    #[test]
    fn nested_containers() {
        // {"a": [1, 2, (3,)], "b": {}}
        let b = P::new()
            .op(op::EMPTY_DICT)
            .put(0)
            .op(op::MARK)
            .s("a")
            .op(op::EMPTY_LIST)
            .put(1)
            .op(op::MARK)
            .int(1)
            .int(2)
            .int(3)
            .op(op::TUPLE1)
            .op(op::APPENDS)
            .s("b")
            .op(op::EMPTY_DICT)
            .op(op::SETITEMS)
            .stop();
        let v = unpickle(&b).unwrap();
        let d = v.as_dict().unwrap();
        assert_eq!(d.entries.len(), 2);
        let a = d.get("a").unwrap().as_seq().unwrap();
        assert_eq!(a[0], Value::Int(1));
        assert_eq!(ints(&a[2]), vec![3]);
        assert_eq!(d.get("b").unwrap().as_dict().unwrap().entries.len(), 0);
        assert_eq!(v.depth(), 3);
    }

    #[test]
    fn memo_sees_containers_filled_after_memoizing() {
        // l = [1, 2]; (l, l) written the way the pickler does: put, fill, then get.
        let b = P::new()
            .op(op::EMPTY_LIST)
            .put(0)
            .op(op::MARK)
            .int(1)
            .int(2)
            .op(op::APPENDS)
            .get(0)
            .op(op::TUPLE2)
            .stop();
        let v = unpickle(&b).unwrap();
        let t = v.as_seq().unwrap();
        assert_eq!(ints(&t[0]), vec![1, 2]);
        assert_eq!(ints(&t[1]), vec![1, 2]);
        // Both are one shared allocation.
        assert!(t[0].ptr_eq(&t[1]));
    }

    #[test]
    fn memo_get_of_unknown_key_fails() {
        let b = P::new().get(7).stop();
        let e = unpickle(&b).unwrap_err();
        assert!(e.reason.contains("memo key 7"), "{e}");
    }

    #[test]
    fn doubling_through_memo_is_cheap() {
        // t = (); repeat 200 times: t = (t, t). A tree of 2^200 nodes, 200 deep, linear work.
        let mut p = P::new().op(op::EMPTY_TUPLE).put(0);
        for _ in 0..200 {
            p = p.get(0).get(0).op(op::TUPLE2).put(0).op(op::POP);
        }
        let b = p.get(0).stop();
        let v = unpickle(&b).unwrap();
        assert_eq!(v.depth(), 201);
        // Debug rendering is bounded too.
        assert!(format!("{v:?}").len() < 10_000);
    }

    #[test]
    fn depth_limit() {
        let mut b = vec![op::PROTO, 2];
        b.extend(std::iter::repeat_n(op::EMPTY_LIST, 300));
        b.extend(std::iter::repeat_n(op::APPEND, 299));
        b.push(op::STOP);
        let e = unpickle(&b).unwrap_err();
        assert!(e.reason.contains("nest deeper"), "{e}");
        // Exactly at the limit is accepted.
        let limits = Limits {
            max_depth: 300,
            ..Limits::default()
        };
        assert_eq!(unpickle_with_limits(&b, limits).unwrap().depth(), 300);
        // Through tuples of marks too.
        let mut b = vec![op::PROTO, 2];
        b.extend(std::iter::repeat_n(op::MARK, 300));
        b.extend(std::iter::repeat_n(op::TUPLE, 300));
        b.push(op::STOP);
        assert!(unpickle(&b).is_err());
    }

    #[test]
    fn op_bound() {
        let mut b = vec![op::PROTO, 2];
        for _ in 0..1000 {
            b.extend([op::NONE, op::POP]);
        }
        b.extend([op::NONE, op::STOP]);
        assert_eq!(unpickle(&b).unwrap(), Value::None);
        let limits = Limits {
            max_ops: 100,
            ..Limits::default()
        };
        let e = unpickle_with_limits(&b, limits).unwrap_err();
        assert!(e.reason.contains("operations"), "{e}");
    }

    #[test]
    fn stack_bound() {
        let mut b = vec![op::PROTO, 2];
        b.extend(std::iter::repeat_n(op::NONE, 50));
        b.push(op::STOP);
        let limits = Limits {
            max_stack: 10,
            ..Limits::default()
        };
        assert!(unpickle_with_limits(&b, limits).is_err());
    }

    #[test]
    fn copy_on_write_is_bounded() {
        // A list that is DUPed stays shared, so every APPEND copies it.
        let mut p = P::new().op(op::EMPTY_LIST);
        for _ in 0..200 {
            p = p.op(op::DUP).int(1).op(op::APPEND);
        }
        let b = p.stop();
        assert!(unpickle(&b).is_ok());
        let limits = Limits {
            max_copy: 1000,
            ..Limits::default()
        };
        let e = unpickle_with_limits(&b, limits).unwrap_err();
        assert!(e.reason.contains("copies"), "{e}");
    }

    #[test]
    fn huge_length_fields_fail_without_allocating() {
        for opcode in [op::BINUNICODE8, op::BINBYTES8] {
            let mut b = vec![op::PROTO, 2, opcode];
            b.extend(u64::MAX.to_le_bytes());
            assert!(unpickle(&b).unwrap_err().reason.contains("truncated"));
        }
        let mut b = vec![op::PROTO, 2, op::BINUNICODE];
        b.extend(u32::MAX.to_le_bytes());
        assert!(unpickle(&b).is_err());
        let mut b = vec![op::PROTO, 2, op::LONG4];
        b.extend(i32::MAX.to_le_bytes());
        assert!(unpickle(&b).unwrap_err().reason.contains("limit"));
    }

    #[test]
    fn globals_reduce_and_build() {
        // argparse.Namespace() with state {"lr": 0.5}, via NEWOBJ and BUILD.
        let b = P::new()
            .op(op::MARK)
            .global("argparse", "Namespace")
            .op(op::EMPTY_TUPLE)
            .op(op::NEWOBJ)
            .op(op::EMPTY_DICT)
            .s("lr")
            .int(5)
            .op(op::SETITEM)
            .op(op::BUILD)
            // OrderedDict() with an attribute state, as a torch state dict has.
            .global("collections", "OrderedDict")
            .op(op::EMPTY_TUPLE)
            .op(op::REDUCE)
            .s("w")
            .int(1)
            .op(op::SETITEM)
            .op(op::EMPTY_DICT)
            .op(op::BUILD)
            // _codecs.encode("\u00ff", "latin1")
            .global("_codecs", "encode")
            .s("\u{ff}")
            .s("latin1")
            .op(op::TUPLE2)
            .op(op::REDUCE)
            // a persistent id and an unknown callable
            .s("storage")
            .op(op::TUPLE1)
            .op(op::BINPERSID)
            .global("torch._utils", "_rebuild_tensor_v2")
            .int(0)
            .op(op::TUPLE1)
            .op(op::REDUCE)
            // STACK_GLOBAL
            .s("torch")
            .s("FloatStorage")
            .op(op::STACK_GLOBAL)
            .op(op::TUPLE)
            .stop();
        let v = unpickle(&b).unwrap();
        let items = v.as_seq().unwrap();
        let ns = items[0].as_object().unwrap();
        assert!(ns.callable.is_global("argparse", "Namespace"));
        assert_eq!(
            ns.state.as_ref().unwrap().as_dict().unwrap().get("lr"),
            Some(&Value::Int(5))
        );
        assert_eq!(items[1].as_dict().unwrap().get("w"), Some(&Value::Int(1)));
        assert_eq!(items[2], Value::Bytes(Rc::from(&[0xffu8][..])));
        assert!(matches!(&items[3], Value::PersistentId(p) if p.pid.as_seq().is_some()));
        let o = items[4].as_object().unwrap();
        assert!(o.callable.is_global("torch._utils", "_rebuild_tensor_v2"));
        assert_eq!(ints(&o.args), vec![0]);
        assert!(items[5].is_global("torch", "FloatStorage"));
    }

    #[test]
    fn dict_keeps_last_value_of_repeated_keys() {
        let b = P::new()
            .op(op::MARK)
            .s("a")
            .int(1)
            .s("b")
            .int(2)
            .s("a")
            .int(3)
            .op(op::DICT)
            .stop();
        let v = unpickle(&b).unwrap();
        let d = v.as_dict().unwrap();
        assert_eq!(d.get("a"), Some(&Value::Int(3)));
        let e = d.entries_dedup();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].0.as_str(), Some("a"));
        assert_eq!(e[0].1, &Value::Int(3));
    }

    #[test]
    fn malformed_streams_fail() {
        let cases: Vec<Vec<u8>> = vec![
            vec![],
            vec![op::PROTO],
            vec![op::PROTO, 9, op::NONE, op::STOP],
            vec![op::STOP],
            vec![op::POP],
            vec![op::NONE],
            vec![op::APPEND, op::STOP],
            vec![op::NONE, op::NONE, op::APPEND, op::STOP],
            vec![op::MARK, op::NONE, op::DICT, op::STOP],
            vec![op::NONE, op::MARK, op::POP, op::STOP],
            vec![op::NONE, op::NONE, op::REDUCE, op::STOP],
            vec![op::GLOBAL, b'a', b'\n'],
            vec![op::NONE, op::BUILD, op::STOP],
            vec![op::NONE, op::NONE, op::BUILD, op::STOP],
            vec![0xff],
            vec![op::NONE, op::SETITEMS],
        ];
        for b in cases {
            assert!(unpickle(&b).is_err(), "{b:?} should fail");
        }
    }

    #[test]
    fn pseudo_random_streams_never_panic() {
        // A fixed xorshift generator over an alphabet biased towards valid opcodes.
        let alphabet: Vec<u8> = b"(.012GJKMNQRTUXabcd}ehjl]qrst)uBC"
            .iter()
            .copied()
            .chain(0x80..=0x95)
            .chain([0, 1, 2, 0xff, b'\n'])
            .collect();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..3000 {
            let mut b = vec![op::PROTO, 2];
            let len = (x % 64) as usize;
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.push(alphabet[(x % alphabet.len() as u64) as usize]);
            }
            let _ = unpickle(&b);
        }
    }
}
