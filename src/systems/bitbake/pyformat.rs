//! Python's `%`-formatting, as `logging.LogRecord.getMessage()` applies it to `msg` and
//! `args`, on decoded pickle values.
//!
//! Supported: `%%`, `%s`, `%r`, `%a`, `%d`/`%i`/`%u`, `%f`/`%F`, `%e`/`%E`, `%g`/`%G`,
//! `%x`/`%X`, `%o`, `%c`, flags (`-`, `0`, `+`, space, `#`), width and precision (also
//! `*`), and `%(name)s` with a dict argument. What Python would raise on (too few
//! arguments, a bad conversion) gives `Err`, and the caller keeps the raw message.

use crate::decode::pickle::Value;

/// The most text one rendering gives: `str()` of a container, and a whole formatted
/// message, are cut there (ending in `…`). A pickle shares what it repeats, so a few
/// hundred bytes can hold a list whose text would be gigabytes; rendering stops at the
/// budget instead of walking all of it.
pub const MAX_RENDERED: usize = 1 << 20;

/// `str(v)` for the values log arguments hold (at most [`MAX_RENDERED`] bytes of
/// containers).
pub fn py_str(v: &Value) -> String {
    let mut out = String::new();
    write_str(v, &mut out);
    cut(&mut out);
    out
}

/// `repr(v)`.
pub fn py_repr(v: &Value) -> String {
    let mut out = String::new();
    write_repr(v, &mut out);
    cut(&mut out);
    out
}

/// Cuts `out` to [`MAX_RENDERED`] bytes (on a character boundary), marking the cut.
fn cut(out: &mut String) {
    if out.len() > MAX_RENDERED {
        let mut end = MAX_RENDERED;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
}

fn write_repr(v: &Value, out: &mut String) {
    match v {
        Value::Str(s) => out.push_str(&crate::decode::pickle::py_str_repr(s)),
        other => write_str(other, out),
    }
}

/// Writes the items of a container, each by `item`, separated by `, `; stops once
/// `out` is over the budget.
fn write_items<T>(items: &[T], out: &mut String, item: impl Fn(&T, &mut String)) {
    for (n, it) in items.iter().enumerate() {
        if out.len() > MAX_RENDERED {
            return;
        }
        if n > 0 {
            out.push_str(", ");
        }
        item(it, out);
    }
}

fn write_str(v: &Value, out: &mut String) {
    if out.len() > MAX_RENDERED {
        return;
    }
    match v {
        Value::None => out.push_str("None"),
        Value::Bool(b) => out.push_str(if *b { "True" } else { "False" }),
        Value::Int(i) => out.push_str(&i.to_string()),
        Value::BigInt(s) => out.push_str(s),
        Value::Float(f) => out.push_str(&py_float(*f)),
        Value::Str(s) => out.push_str(s),
        Value::List(items) => {
            out.push('[');
            write_items(items, out, write_repr);
            out.push(']');
        }
        Value::Tuple(items) if items.len() == 1 => {
            out.push('(');
            write_repr(&items[0], out);
            out.push_str(",)");
        }
        Value::Tuple(items) => {
            out.push('(');
            write_items(items, out, write_repr);
            out.push(')');
        }
        Value::Dict(entries) => {
            out.push('{');
            write_items(entries, out, |(k, v), out| {
                write_repr(k, out);
                out.push_str(": ");
                write_repr(v, out);
            });
            out.push('}');
        }
        Value::Set(items) | Value::FrozenSet(items) => {
            let frozen = matches!(v, Value::FrozenSet(_));
            if items.is_empty() {
                out.push_str(if frozen { "frozenset()" } else { "set()" });
                return;
            }
            out.push_str(if frozen { "frozenset({" } else { "{" });
            write_items(items, out, write_repr);
            out.push_str(if frozen { "})" } else { "}" });
        }
        Value::Object(o) => {
            out.push('<');
            out.push_str(&o.class);
            out.push_str(" object>");
        }
        Value::Global(g) => {
            out.push_str("<class '");
            out.push_str(g);
            out.push_str("'>");
        }
        other => out.push_str(&format!("{other:?}")),
    }
}

fn py_float(f: f64) -> String {
    if f.is_nan() {
        "nan".into()
    } else if f.is_infinite() {
        if f > 0.0 { "inf" } else { "-inf" }.into()
    } else if f == f.trunc() && f.abs() < 1e16 {
        format!("{f:.1}")
    } else {
        format!("{f}")
    }
}

fn as_int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::Bool(b) => Some(i64::from(*b)),
        Value::Float(f) if f.is_finite() => Some(f.trunc() as i64),
        _ => None,
    }
}

fn as_float(v: &Value) -> Option<f64> {
    match v {
        Value::Float(f) => Some(*f),
        Value::Int(i) => Some(*i as f64),
        Value::Bool(b) => Some(f64::from(u8::from(*b))),
        _ => None,
    }
}

/// The widest field and the longest precision honoured, whether written in the format
/// (`%99999d`) or taken from the arguments (`%*d`, `%.*f`): a log record's arguments
/// are input, and a width of 10**10 would otherwise ask for 10 GB.
const MAX_FIELD: usize = 4096;

/// A `*` width or precision from the arguments, bounded by [`MAX_FIELD`].
fn star(v: &Value) -> usize {
    v.as_i64().unwrap_or(0).clamp(0, MAX_FIELD as i64) as usize
}

struct Spec {
    left: bool,
    zero: bool,
    plus: bool,
    space: bool,
    alt: bool,
    width: usize,
    precision: Option<usize>,
}

fn pad(spec: &Spec, body: String, numeric: bool) -> String {
    let len = body.chars().count();
    if len >= spec.width {
        return body;
    }
    let fill = spec.width - len;
    if spec.left {
        format!("{body}{}", " ".repeat(fill))
    } else if spec.zero && numeric {
        let (sign, digits) = match body.chars().next() {
            Some(c @ ('-' | '+' | ' ')) => (c.to_string(), body[1..].to_string()),
            _ => (String::new(), body),
        };
        format!("{sign}{}{digits}", "0".repeat(fill))
    } else {
        format!("{}{body}", " ".repeat(fill))
    }
}

fn signed(spec: &Spec, negative: bool, digits: String) -> String {
    let sign = if negative {
        "-"
    } else if spec.plus {
        "+"
    } else if spec.space {
        " "
    } else {
        ""
    };
    format!("{sign}{digits}")
}

fn convert(spec: &Spec, conv: char, v: &Value) -> Result<String, String> {
    let bad = || format!("%{conv} format: a number is required, not {}", py_repr(v));
    let body = match conv {
        's' | 'r' | 'a' => {
            let s = if conv == 's' { py_str(v) } else { py_repr(v) };
            let s = match spec.precision {
                Some(p) => s.chars().take(p).collect(),
                None => s,
            };
            return Ok(pad(spec, s, false));
        }
        'd' | 'i' | 'u' => {
            let i = as_int(v).ok_or_else(bad)?;
            signed(spec, i < 0, i.unsigned_abs().to_string())
        }
        'x' | 'X' | 'o' => {
            let i = as_int(v).ok_or_else(bad)?;
            let digits = match conv {
                'x' => format!("{:x}", i.unsigned_abs()),
                'X' => format!("{:X}", i.unsigned_abs()),
                _ => format!("{:o}", i.unsigned_abs()),
            };
            let prefix = match (spec.alt, conv) {
                (true, 'x') => "0x",
                (true, 'X') => "0X",
                (true, _) => "0o",
                _ => "",
            };
            signed(spec, i < 0, format!("{prefix}{digits}"))
        }
        'f' | 'F' | 'e' | 'E' | 'g' | 'G' => {
            let f = as_float(v).ok_or_else(bad)?;
            let p = spec.precision.unwrap_or(6);
            let digits = match conv {
                'f' | 'F' => format!("{:.*}", p, f.abs()),
                'e' | 'E' => {
                    let s = format!("{:.*e}", p, f.abs());
                    // Rust writes 1.5e2; Python writes 1.5e+02.
                    let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
                    let e: i32 = e.parse().unwrap_or(0);
                    let s = format!("{m}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs());
                    if conv == 'E' {
                        s.to_uppercase()
                    } else {
                        s
                    }
                }
                _ => {
                    let s = py_float(f.abs());
                    let s = s.strip_suffix(".0").map(str::to_string).unwrap_or(s);
                    if conv == 'G' {
                        s.to_uppercase()
                    } else {
                        s
                    }
                }
            };
            signed(spec, f.is_sign_negative() && f != 0.0, digits)
        }
        'c' => match v {
            Value::Int(i) => char::from_u32(u32::try_from(*i).map_err(|_| bad())?)
                .ok_or_else(bad)?
                .to_string(),
            Value::Str(s) if s.chars().count() == 1 => s.to_string(),
            _ => return Err(format!("%c requires an int or a char, not {}", py_repr(v))),
        },
        other => return Err(format!("unsupported format character {other:?}")),
    };
    Ok(pad(spec, body, conv != 'c'))
}

/// `msg % args` as Python would compute it.
pub fn format(msg: &str, args: &Value) -> Result<String, String> {
    // A single non-tuple argument is the argument; a dict may be used by name.
    let positional: Vec<&Value> = match args {
        Value::Tuple(items) => items.iter().collect(),
        Value::Dict(_) => vec![args],
        other => vec![other],
    };
    if !msg.contains('%') {
        return Ok(msg.to_string());
    }
    let chars: Vec<char> = msg.chars().collect();
    let mut out = String::with_capacity(msg.len() + 16);
    let mut next = 0usize;
    let mut take = |out_of: &str| -> Result<&Value, String> {
        let v = positional
            .get(next)
            .copied()
            .ok_or_else(|| format!("not enough arguments for format string ({out_of})"))?;
        next += 1;
        Ok(v)
    };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        i += 1;
        if c != '%' {
            out.push(c);
            continue;
        }
        let mut key: Option<String> = None;
        if chars.get(i) == Some(&'(') {
            let end = chars[i..]
                .iter()
                .position(|&c| c == ')')
                .ok_or("incomplete format key")?;
            key = Some(chars[i + 1..i + end].iter().collect());
            i += end + 1;
        }
        let mut spec = Spec {
            left: false,
            zero: false,
            plus: false,
            space: false,
            alt: false,
            width: 0,
            precision: None,
        };
        while let Some(&f) = chars.get(i) {
            match f {
                '-' => spec.left = true,
                '0' => spec.zero = true,
                '+' => spec.plus = true,
                ' ' => spec.space = true,
                '#' => spec.alt = true,
                _ => break,
            }
            i += 1;
        }
        if chars.get(i) == Some(&'*') {
            spec.width = star(take("*")?);
            i += 1;
        } else {
            while let Some(d) = chars.get(i).and_then(|c| c.to_digit(10)) {
                spec.width = spec
                    .width
                    .saturating_mul(10)
                    .saturating_add(d as usize)
                    .min(MAX_FIELD);
                i += 1;
            }
        }
        if chars.get(i) == Some(&'.') {
            i += 1;
            let mut p = 0usize;
            if chars.get(i) == Some(&'*') {
                p = star(take(".*")?);
                i += 1;
            } else {
                while let Some(d) = chars.get(i).and_then(|c| c.to_digit(10)) {
                    p = p
                        .saturating_mul(10)
                        .saturating_add(d as usize)
                        .min(MAX_FIELD);
                    i += 1;
                }
            }
            spec.precision = Some(p);
        }
        // Length modifiers are accepted and ignored, as Python does.
        while matches!(chars.get(i), Some('h' | 'l' | 'L')) {
            i += 1;
        }
        let conv = *chars.get(i).ok_or("incomplete format")?;
        i += 1;
        if conv == '%' {
            out.push('%');
            continue;
        }
        let v = match &key {
            Some(k) => args
                .get(k)
                .ok_or_else(|| format!("format key {k:?} not in the arguments"))?,
            None => take(msg)?,
        };
        out.push_str(&convert(&spec, conv, v)?);
        if out.len() > MAX_RENDERED {
            // A message over the budget (a dict argument may be used by name again and
            // again): the rest of it is not worked out.
            cut(&mut out);
            return Ok(out);
        }
    }
    if key_free_leftover(next, &positional, args) {
        return Err("not all arguments converted during string formatting".into());
    }
    Ok(out)
}

fn key_free_leftover(used: usize, positional: &[&Value], args: &Value) -> bool {
    !matches!(args, Value::Dict(_)) && used < positional.len() && matches!(args, Value::Tuple(_))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn t(items: Vec<Value>) -> Value {
        Value::Tuple(Arc::from(items))
    }

    fn s(x: &str) -> Value {
        Value::Str(Arc::from(x))
    }

    #[test]
    fn shared_values_render_within_the_budget() {
        // Pickles share what they repeat: 2**24 references to one string in a few
        // hundred bytes. Its text is cut at the budget instead of being worked out.
        let mut v = s("xxxxxxxx");
        for _ in 0..24 {
            v = Value::List(Arc::from(vec![v.clone(), v]));
        }
        let text = py_str(&v);
        assert!(
            text.len() <= MAX_RENDERED + '…'.len_utf8(),
            "{}",
            text.len()
        );
        assert!(text.starts_with("[[[[") && text.ends_with('…'));
        // A dict argument used by name again and again: the message is cut too.
        let args = Value::Dict(Arc::from(vec![(s("a"), v)]));
        let msg = "%(a)s".repeat(1000);
        let text = format(&msg, &args).unwrap();
        assert!(
            text.len() <= MAX_RENDERED + '…'.len_utf8(),
            "{}",
            text.len()
        );
        // Small ones as Python writes them.
        let set = Value::Set(Arc::from(vec![Value::Int(1), s("a")]));
        assert_eq!(py_str(&set), "{1, 'a'}");
        assert_eq!(py_str(&Value::FrozenSet(Arc::from(vec![]))), "frozenset()");
    }

    #[test]
    fn widths_and_precisions_from_the_arguments_are_bounded() {
        // A LogRecord is input: `%*d` with a width of 10**10 must not ask for 10 GB.
        let wide = format("%*d", &t(vec![Value::Int(10_000_000_000), Value::Int(7)])).unwrap();
        assert_eq!(wide.len(), MAX_FIELD);
        assert!(wide.ends_with(" 7"));
        let long = format("%.*f", &t(vec![Value::Int(i64::MAX), Value::Float(1.5)])).unwrap();
        assert_eq!(long.len(), "1.".len() + MAX_FIELD);
        assert!(long.starts_with("1.5000"));
        // Written in the format, the same bound (as before).
        assert_eq!(format("%99999d", &Value::Int(1)).unwrap().len(), MAX_FIELD);
        // Small ones are honoured exactly, as Python does.
        assert_eq!(
            format(
                "%*d|%.*f",
                &t(vec![
                    Value::Int(4),
                    Value::Int(7),
                    Value::Int(2),
                    Value::Float(0.5)
                ])
            )
            .unwrap(),
            "   7|0.50"
        );
    }

    #[test]
    fn formats_like_python() {
        let args = t(vec![Value::Int(58), Value::Int(0)]);
        assert_eq!(
            format(
                "Tasks Summary: Attempted %d tasks of which %d didn't need to be rerun",
                &args
            )
            .unwrap(),
            "Tasks Summary: Attempted 58 tasks of which 0 didn't need to be rerun"
        );
        assert_eq!(
            format(
                "%5.1f|%-4s|%04d|%x|%%",
                &t(vec![
                    Value::Float(1.25),
                    s("ab"),
                    Value::Int(-7),
                    Value::Int(255)
                ])
            )
            .unwrap(),
            "  1.2|ab  |-007|ff|%"
        );
        assert_eq!(
            format("%r and %s", &t(vec![s("it's"), Value::None])).unwrap(),
            "\"it's\" and None"
        );
        assert_eq!(format("no args", &t(vec![])).unwrap(), "no args");
        assert_eq!(
            format("%.2e", &t(vec![Value::Float(12345.678)])).unwrap(),
            "1.23e+04"
        );
        assert!(format("%d %d", &t(vec![Value::Int(1)])).is_err());
        assert!(format("%d", &t(vec![s("x")])).is_err());
        assert!(format("%s", &t(vec![s("a"), s("b")])).is_err());
        let d = Value::Dict(Arc::from(vec![(s("n"), Value::Int(3))]));
        assert_eq!(format("%(n)d items", &d).unwrap(), "3 items");
        // A single argument that is not a tuple is the argument.
        assert_eq!(format("just %s", &s("one")).unwrap(), "just one");
    }
}
