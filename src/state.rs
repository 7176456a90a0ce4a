//! Device state messages: parsing and validation shared by HTTP and MQTT.
//!
//! A message is `{"data": {ATTR: VALUE, ...}, "time": T}`. Parsing borrows
//! from the request body: the stored history value is the exact bytes of
//! `data` as sent (so read-back is byte-equal), found as a span of the body,
//! and the composite-state operand for the whole request (with a keyed hash
//! of each attribute name, for the attribute limit) is built here, on the
//! connection's task, so the single writer thread only copies bytes and
//! looks hashes up. One serde_json pass over the body validates it and
//! collects the attributes; each `data` span is then found from its first
//! and last values (`data_span`), so `data` is not scanned a second time.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use smallvec::SmallVec;

use crate::composite;
use crate::timefmt;

/// Most states in one HTTP request.
pub const MAX_STATES_PER_REQUEST: usize = 1000;
/// Longest attribute name, in characters.
pub const MAX_ATTR_NAME_CHARS: usize = 255;
/// Deepest nesting of arrays and objects inside `data` (the `data` object
/// itself is level 1). Deeper values are refused rather than stored, so
/// nothing that reads state back ever meets a pathological document.
pub const MAX_DATA_DEPTH: usize = 32;

/// One accepted state: its time and where its `data` object lies in the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateSpan {
    pub time_ms: u64,
    pub data: Range<u32>,
}

/// A validated request: every state it holds plus the composite operand.
#[derive(Debug, Default)]
pub struct ParsedStates {
    pub states: SmallVec<[StateSpan; 1]>,
    /// Encoded per `composite`: the newest value of each attribute in the
    /// request.
    pub composite: Vec<u8>,
    /// `composite::name_hash` of each attribute name in `composite`,
    /// computed here on the connection's task so the single writer thread
    /// only looks them up for the attribute limit. Inline up to 8 names.
    pub names: SmallVec<[u64; 8]>,
    /// The receive time the parse was given (Unix ms): the time of every
    /// state without its own. Cluster mode sends it with each state, so
    /// every broker that applies the state gives it the same time.
    pub received_ms: i64,
}

/// The first problem found, worded for the `detail` of a 400 response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadState(pub String);

/// Whether a body may be an array of states (HTTP) or only one (MQTT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    OneOrArray,
    One,
}

/// Parses and validates `body`. `now_ms` is the receive time, used for
/// states without `time`.
pub fn parse(body: &[u8], shape: Shape, now_ms: i64) -> Result<ParsedStates, BadState> {
    if body.len() > u32::MAX as usize {
        return Err(BadState("body too large".into()));
    }
    let mut acc = Acc {
        body,
        now_ms: now_ms.max(0) as u64,
        out: ParsedStates {
            received_ms: now_ms,
            ..ParsedStates::default()
        },
        attrs: SmallVec::new(),
    };
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let mut de = serde_json::Deserializer::from_slice(body);
    let res = match (first, shape) {
        (Some(b'['), Shape::OneOrArray) => StatesSeed { acc: &mut acc }.deserialize(&mut de),
        (Some(b'{'), _) => StateSeed { acc: &mut acc }.deserialize(&mut de),
        (None, _) => return Err(BadState("body is empty".into())),
        (_, Shape::OneOrArray) => {
            return Err(BadState(
                "body must be a state object {\"data\": {...}} or an array of them".into(),
            ))
        }
        (_, Shape::One) => {
            return Err(BadState(
                "payload must be a state object {\"data\": {...}}".into(),
            ))
        }
    };
    res.and_then(|()| de.end())
        .map_err(|e| BadState(e.to_string()))?;
    acc.finish_composite();
    Ok(acc.out)
}

/// The exact text of each element of a JSON array of objects, as byte
/// ranges of `body`, in order. `body` must be text `parse` accepted with
/// [`Shape::OneOrArray`] (so it is valid JSON); `None` if it is not an array
/// of objects after all. Cluster mode publishes each state of an HTTP array
/// as its own message with exactly the text the device sent for it.
pub fn array_elements(body: &[u8]) -> Option<SmallVec<[Range<u32>; 1]>> {
    let mut out = SmallVec::new();
    let mut i = body.iter().position(|b| !b.is_ascii_whitespace())?;
    if body[i] != b'[' {
        return None;
    }
    i += 1;
    loop {
        i += body[i..].iter().position(|b| !b.is_ascii_whitespace())?;
        match body[i] {
            b']' => return Some(out),
            b',' if !out.is_empty() => {
                i += 1;
                continue;
            }
            b'{' => {}
            _ => return None,
        }
        let start = i;
        let (mut depth, mut in_str, mut esc) = (0usize, false, false);
        loop {
            let b = *body.get(i)?;
            i += 1;
            if in_str {
                if esc {
                    esc = false;
                } else if b == b'\\' {
                    esc = true;
                } else if b == b'"' {
                    in_str = false;
                }
                continue;
            }
            match b {
                b'"' => in_str = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
        }
        out.push(u32::try_from(start).ok()?..u32::try_from(i).ok()?);
    }
}

/// One attribute seen, in message order.
struct Attr<'a> {
    name: Cow<'a, str>,
    time_ms: u64,
    value: &'a str,
}

struct Acc<'a> {
    body: &'a [u8],
    now_ms: u64,
    out: ParsedStates,
    /// Every attribute seen, in order; inline up to 8, the usual state,
    /// so a request's parse allocates only the composite operand.
    attrs: SmallVec<[Attr<'a>; 8]>,
}

impl<'a> Acc<'a> {
    fn finish_composite(&mut self) {
        // Stable sort keeps message order within a name, so on equal times
        // the later message wins, as in the merge operator.
        self.attrs.sort_by(|a, b| a.name.cmp(&b.name));
        let mut out = Vec::with_capacity(
            self.attrs
                .iter()
                .map(|a| a.name.len() + a.value.len() + 14)
                .sum(),
        );
        let mut i = 0;
        while i < self.attrs.len() {
            let mut best = i;
            let mut j = i + 1;
            while j < self.attrs.len() && self.attrs[j].name == self.attrs[i].name {
                if self.attrs[j].time_ms >= self.attrs[best].time_ms {
                    best = j;
                }
                j += 1;
            }
            let a = &self.attrs[best];
            composite::encode_entry(&mut out, a.name.as_bytes(), a.time_ms, a.value.as_bytes());
            self.out.names.push(composite::name_hash(a.name.as_bytes()));
            i = j;
        }
        self.out.composite = out;
    }
}

struct StatesSeed<'s, 'a> {
    acc: &'s mut Acc<'a>,
}

impl<'de: 'a, 'a> DeserializeSeed<'de> for StatesSeed<'_, 'a> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for StatesSeed<'_, 'a> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of state objects")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let mut n = 0;
        loop {
            if n == MAX_STATES_PER_REQUEST {
                // Peek by parsing one more element; anything there is too many.
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom(format_args!(
                        "at most {MAX_STATES_PER_REQUEST} states per request"
                    )));
                }
                break;
            }
            if seq
                .next_element_seed(StateSeed { acc: self.acc })?
                .is_none()
            {
                break;
            }
            n += 1;
        }
        if n == 0 {
            return Err(de::Error::custom("the array of states is empty"));
        }
        Ok(())
    }
}

struct StateSeed<'s, 'a> {
    acc: &'s mut Acc<'a>,
}

impl<'de: 'a, 'a> DeserializeSeed<'de> for StateSeed<'_, 'a> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

#[derive(serde::Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Field {
    Data,
    Time,
}

impl<'de: 'a, 'a> Visitor<'de> for StateSeed<'_, 'a> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a state object {\"data\": {...}, \"time\": ...}")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        // `data` is validated and its attributes collected in the same pass
        // over the body; their time is filled in once `time` (which may
        // come after `data`) is known.
        let first_attr = self.acc.attrs.len();
        let mut data_seen = false;
        let mut time: Option<Option<u64>> = None;
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Data => {
                    if data_seen {
                        return Err(de::Error::duplicate_field("data"));
                    }
                    map.next_value_seed(AttrsSeed { acc: self.acc })?;
                    data_seen = true;
                }
                Field::Time => {
                    if time.is_some() {
                        return Err(de::Error::duplicate_field("time"));
                    }
                    time = Some(map.next_value::<TimeValue>()?.0);
                }
            }
        }
        if !data_seen {
            return Err(de::Error::missing_field("data"));
        }
        let time_ms = time.flatten().unwrap_or(self.acc.now_ms);
        let attrs = &mut self.acc.attrs[first_attr..];
        let (Some(first), Some(last)) = (attrs.first(), attrs.last()) else {
            return Err(de::Error::custom("`data` must have at least one attribute"));
        };
        let span = data_span(self.acc.body, first.value, last.value)
            .ok_or_else(|| de::Error::custom("`data` could not be located in the body"))?;
        for a in attrs.iter_mut() {
            a.time_ms = time_ms;
        }
        if nesting_depth(&self.acc.body[span.clone()]) > MAX_DATA_DEPTH {
            return Err(de::Error::custom(format_args!(
                "`data` is nested deeper than {MAX_DATA_DEPTH} levels"
            )));
        }
        if let Some(dup) = duplicate_name(&self.acc.attrs[first_attr..]) {
            return Err(de::Error::custom(format_args!(
                "duplicate attribute {dup:?} in `data`"
            )));
        }
        self.acc.out.states.push(StateSpan {
            time_ms,
            data: span.start as u32..span.end as u32,
        });
        Ok(())
    }
}

/// The byte range of the `data` object in `body`, from the text of its
/// first and last attribute values (slices of `body`, which the parser has
/// validated as JSON): back from the first value over `"name" :` to the
/// `{`, forward from the last value to the `}`. `None` only if the values
/// are not where valid JSON puts them, which would be a bug.
fn data_span(body: &[u8], first_value: &str, last_value: &str) -> Option<Range<usize>> {
    let base = body.as_ptr() as usize;
    let first = (first_value.as_ptr() as usize).checked_sub(base)?;
    let last_end = (last_value.as_ptr() as usize).checked_sub(base)? + last_value.len();
    if first > body.len() || last_end > body.len() {
        return None;
    }
    let ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    // Back over whitespace, the colon and whitespace to the name's closing
    // quote.
    let mut i = first;
    i -= body[..i].iter().rev().take_while(|b| ws(b)).count();
    if i == 0 || body[i - 1] != b':' {
        return None;
    }
    i -= 1;
    i -= body[..i].iter().rev().take_while(|b| ws(b)).count();
    if i == 0 || body[i - 1] != b'"' {
        return None;
    }
    i -= 1;
    // Back to the opening quote: the first quote not escaped, i.e. not
    // preceded by an odd number of backslashes.
    loop {
        let q = body[..i].iter().rposition(|&b| b == b'"')?;
        let backslashes = body[..q].iter().rev().take_while(|&&b| b == b'\\').count();
        i = q;
        if backslashes % 2 == 0 {
            break;
        }
    }
    i -= body[..i].iter().rev().take_while(|b| ws(b)).count();
    if i == 0 || body[i - 1] != b'{' {
        return None;
    }
    let start = i - 1;
    let end = last_end + body[last_end..].iter().take_while(|b| ws(b)).count();
    (body.get(end) == Some(&b'}')).then_some(start..end + 1)
}

/// Maximum nesting of `[`/`{` in valid JSON text, ignoring strings.
fn nesting_depth(json: &[u8]) -> usize {
    let (mut depth, mut max, mut in_str, mut esc) = (0usize, 0usize, false, false);
    for &b in json {
        if in_str {
            if esc {
                esc = false;
            } else if b == b'\\' {
                esc = true;
            } else if b == b'"' {
                in_str = false;
            }
            continue;
        }
        match b {
            b'"' => in_str = true,
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

fn duplicate_name<'x>(attrs: &'x [Attr<'_>]) -> Option<&'x str> {
    if attrs.len() <= 16 {
        for (i, a) in attrs.iter().enumerate() {
            if attrs[i + 1..].iter().any(|b| b.name == a.name) {
                return Some(&a.name);
            }
        }
        return None;
    }
    let mut names: Vec<&str> = attrs.iter().map(|a| &*a.name).collect();
    names.sort_unstable();
    names.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
}

/// The attributes of one `data` object, pushed to `acc.attrs` (with a
/// time filled in by the caller).
struct AttrsSeed<'s, 'a> {
    acc: &'s mut Acc<'a>,
}

impl<'de: 'a, 'a> DeserializeSeed<'de> for AttrsSeed<'_, 'a> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

const NOT_AN_OBJECT: &str = "`data` must be an object";

impl<'de: 'a, 'a> Visitor<'de> for AttrsSeed<'_, 'a> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of attributes")
    }

    // Every other JSON value is refused in the same words.
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom(NOT_AN_OBJECT))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom(NOT_AN_OBJECT))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom(NOT_AN_OBJECT))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom(NOT_AN_OBJECT))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom(NOT_AN_OBJECT))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom(NOT_AN_OBJECT))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(NOT_AN_OBJECT))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(name) = map.next_key_seed(NameSeed)? {
            let chars = name.chars().count();
            if chars == 0 {
                return Err(de::Error::custom("attribute names must not be empty"));
            }
            if chars > MAX_ATTR_NAME_CHARS {
                let head: String = name.chars().take(32).collect();
                return Err(de::Error::custom(format_args!(
                    "attribute name \"{head}...\" is longer than {MAX_ATTR_NAME_CHARS} characters"
                )));
            }
            if name.chars().any(char::is_control) {
                return Err(de::Error::custom(
                    "attribute names must not contain control characters",
                ));
            }
            let value: &'de RawValue = map.next_value()?;
            self.acc.attrs.push(Attr {
                name,
                time_ms: 0,
                value: value.get(),
            });
        }
        Ok(())
    }
}

/// Attribute names borrowed from the body unless they contain escapes.
struct NameSeed;

impl<'de> DeserializeSeed<'de> for NameSeed {
    type Value = Cow<'de, str>;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for NameSeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an attribute name")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }
}

/// `time`: RFC 3339 string, epoch milliseconds, or null (= receive time).
struct TimeValue(Option<u64>);

impl<'de> serde::Deserialize<'de> for TimeValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<TimeValue, D::Error> {
        d.deserialize_any(TimeVisitor)
    }
}

struct TimeVisitor;

impl<'de> Visitor<'de> for TimeVisitor {
    type Value = TimeValue;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("`time` as an RFC 3339 string or epoch milliseconds")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<TimeValue, E> {
        let ms = i64::try_from(v).unwrap_or(i64::MAX);
        timefmt::check_ms(ms)
            .map(|ms| TimeValue(Some(ms as u64)))
            .map_err(|e| E::custom(format_args!("`time`: {e}")))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<TimeValue, E> {
        timefmt::check_ms(v)
            .map(|ms| TimeValue(Some(ms as u64)))
            .map_err(|e| E::custom(format_args!("`time`: {e}")))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<TimeValue, E> {
        Err(E::custom(
            "`time` must be an integer number of epoch milliseconds or an RFC 3339 string",
        ))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<TimeValue, E> {
        timefmt::parse_rfc3339(v)
            .map(|ms| TimeValue(Some(ms as u64)))
            .map_err(|e| E::custom(format_args!("`time`: {e}")))
    }

    fn visit_unit<E: de::Error>(self) -> Result<TimeValue, E> {
        Ok(TimeValue(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data_of<'a>(body: &'a str, s: &StateSpan) -> &'a str {
        &body[s.data.start as usize..s.data.end as usize]
    }

    /// The span found in one pass is exactly the `data` text serde_json
    /// itself delimits, whatever the whitespace, escapes and nesting.
    #[test]
    fn data_spans_match_serde_json() {
        #[derive(serde::Deserialize)]
        struct Outer<'a> {
            #[serde(borrow)]
            data: &'a RawValue,
        }
        let bodies = [
            r#"{"data":{"a":1}}"#,
            r#"  {  "time" : 5 ,  "data"  :  {  "a"  :  1  ,  "b" : [1,{"x":"}"}]  }  }  "#,
            "{\"data\":\n\t{\r\n\"a\":\"v\"\n}\n}",
            r#"{"data":{"q\"uote":1,"z":2}}"#,
            r#"{"data":{"back\\":1}}"#,
            r#"{"data":{"\\\"x":true}}"#,
            r#"{"data":{"br{ace\"}":null,"end":"}\"\\"}}"#,
            r#"{"data":{"\u00e9t\u00e9":{"deep":[[[{"a":[]}]]]}},"time":"2024-01-01T00:00:00Z"}"#,
            r#"{"data":{"é":"ü","日本":1.5e3}}"#,
            r#"[{"data":{"a":1}} , {"time":1,"data":{ "b":"{" }},{"data":{"c\\\\":"\\"}}]"#,
        ];
        for body in bodies {
            let p = parse(body.as_bytes(), Shape::OneOrArray, 0)
                .unwrap_or_else(|e| panic!("{body}: {e}"));
            let trimmed = body.trim_start();
            let want: Vec<&str> = if trimmed.starts_with('[') {
                serde_json::from_str::<Vec<Outer>>(body)
                    .unwrap()
                    .iter()
                    .map(|o| o.data.get())
                    .collect()
            } else {
                vec![serde_json::from_str::<Outer>(body).unwrap().data.get()]
            };
            let got: Vec<&str> = p.states.iter().map(|s| data_of(body, s)).collect();
            assert_eq!(got, want, "{body}");
        }
    }

    #[test]
    fn names_are_hashed_once_each_in_composite_order() {
        let p = parse(
            br#"[{"data":{"b":1,"a":2},"time":1},{"data":{"a":3,"c":4},"time":2}]"#,
            Shape::OneOrArray,
            0,
        )
        .unwrap();
        let want: Vec<u64> = composite::entries(&p.composite)
            .map(|e| composite::name_hash(e.name))
            .collect();
        assert_eq!(p.names.as_slice(), want.as_slice());
        assert_eq!(want.len(), 3);
        assert_eq!(want[0], composite::name_hash(b"a"));
    }

    fn comp(p: &ParsedStates) -> Vec<(String, u64, String)> {
        composite::decoded(&p.composite)
    }

    #[test]
    fn single_state_keeps_exact_bytes() {
        let body = r#" { "time": 1000, "data" : {"temp": 21.5, "tags": ["a", {"b": null}]} } "#;
        let p = parse(body.as_bytes(), Shape::One, 5).unwrap();
        assert_eq!(p.states.len(), 1);
        assert_eq!(p.states[0].time_ms, 1000);
        assert_eq!(
            data_of(body, &p.states[0]),
            r#"{"temp": 21.5, "tags": ["a", {"b": null}]}"#
        );
        assert_eq!(
            comp(&p),
            vec![
                ("tags".into(), 1000, r#"["a", {"b": null}]"#.into()),
                ("temp".into(), 1000, "21.5".into())
            ]
        );
    }

    #[test]
    fn array_builds_latest_composite() {
        let body = r#"[{"data":{"a":1,"b":1},"time":"1970-01-01T00:00:02Z"},{"data":{"a":2},"time":1000},{"data":{"b":"x"}}]"#;
        let p = parse(body.as_bytes(), Shape::OneOrArray, 3000).unwrap();
        assert_eq!(p.states.len(), 3);
        assert_eq!(p.states[0].time_ms, 2000);
        assert_eq!(p.states[2].time_ms, 3000);
        assert_eq!(data_of(body, &p.states[1]), r#"{"a":2}"#);
        assert_eq!(
            comp(&p),
            vec![
                ("a".into(), 2000, "1".into()),
                ("b".into(), 3000, "\"x\"".into())
            ]
        );
    }

    #[test]
    fn escaped_names_are_decoded() {
        let body = r#"{"data":{"\u0074emp":1}}"#;
        let p = parse(body.as_bytes(), Shape::One, 1).unwrap();
        assert_eq!(comp(&p)[0].0, "temp");
        let dup = r#"{"data":{"\u0074emp":1,"temp":2}}"#;
        let e = parse(dup.as_bytes(), Shape::One, 1).unwrap_err();
        assert!(e.0.contains("duplicate attribute \"temp\""), "{e}");
    }

    #[test]
    fn rejections_name_the_problem() {
        let cases: &[(&str, Shape, &str)] = &[
            ("", Shape::OneOrArray, "empty"),
            ("nope", Shape::OneOrArray, "state object"),
            ("[1]", Shape::One, "payload must be a state object"),
            ("{}", Shape::One, "missing field `data`"),
            (r#"{"data":5}"#, Shape::One, "must be an object"),
            (r#"{"data":{}}"#, Shape::One, "at least one attribute"),
            (r#"{"data":{"a":1},"x":2}"#, Shape::One, "unknown field `x`"),
            (
                r#"{"data":{"a":1},"data":{"b":1}}"#,
                Shape::One,
                "duplicate field `data`",
            ),
            (r#"{"data":{"a":1},"time":-1}"#, Shape::One, "out of range"),
            (r#"{"data":{"a":1},"time":1.5}"#, Shape::One, "integer"),
            (r#"{"data":{"a":1},"time":"soon"}"#, Shape::One, "RFC 3339"),
            (
                r#"{"data":{"a":1},"time":99999999999999999999}"#,
                Shape::One,
                "integer",
            ),
            (
                r#"{"data":{"a":1},"time":253402300800000}"#,
                Shape::One,
                "out of range",
            ),
            (r#"{"data":{"":1}}"#, Shape::One, "must not be empty"),
            (
                r#"{"data":{"a\u0000b":1}}"#,
                Shape::One,
                "control characters",
            ),
            (r#"{"data":{"a":1}"#, Shape::One, "EOF"),
            (r#"{"data":{"a":1}} x"#, Shape::One, "trailing"),
            ("[]", Shape::OneOrArray, "empty"),
            (
                r#"[{"data":{"a":1}}, 5]"#,
                Shape::OneOrArray,
                "state object",
            ),
        ];
        for (body, shape, want) in cases {
            let e = parse(body.as_bytes(), *shape, 1).unwrap_err();
            assert!(e.0.contains(want), "{body:?}: {e}");
        }
        let long = format!(r#"{{"data":{{"{}":1}}}}"#, "n".repeat(256));
        assert!(parse(long.as_bytes(), Shape::One, 1)
            .unwrap_err()
            .0
            .contains("longer than 255"));
        let ok = format!(r#"{{"data":{{"{}":1}}}}"#, "é".repeat(255));
        assert!(parse(ok.as_bytes(), Shape::One, 1).is_ok());
        let deep = |n: usize| format!(r#"{{"data":{{"a":{}1{}}}}}"#, "[".repeat(n), "]".repeat(n));
        assert!(parse(deep(31).as_bytes(), Shape::One, 1).is_ok());
        assert!(parse(deep(32).as_bytes(), Shape::One, 1)
            .unwrap_err()
            .0
            .contains("nested deeper than 32"));
        assert!(parse(deep(100_000).as_bytes(), Shape::One, 1).is_err());
        let tricky = r#"{"data":{"a":"[[[[\"[[[[","b":[{"c":"}}}"}]}}"#;
        assert!(parse(tricky.as_bytes(), Shape::One, 1).is_ok());
        assert!(parse(b"{\"data\":{\"a\":\"\xff\"}}", Shape::One, 1).is_err());
    }

    #[test]
    fn array_elements_are_the_exact_texts() {
        let body = r#" [ {"data":{"a":"}]"},"time":1} ,{ "data" : {"b":[1,{"c":"\"{"}]}}
,{"data":{"a":2}}] "#;
        let p = parse(body.as_bytes(), Shape::OneOrArray, 7).unwrap();
        assert_eq!(p.received_ms, 7);
        let el = array_elements(body.as_bytes()).unwrap();
        let texts: Vec<&str> = el
            .iter()
            .map(|r| &body[r.start as usize..r.end as usize])
            .collect();
        assert_eq!(
            texts,
            vec![
                r#"{"data":{"a":"}]"},"time":1}"#,
                r#"{ "data" : {"b":[1,{"c":"\"{"}]}}"#,
                r#"{"data":{"a":2}}"#
            ]
        );
        assert_eq!(el.len(), p.states.len());
        // Each element parses alone to the same state.
        for (r, s) in el.iter().zip(&p.states) {
            let alone = parse(
                &body.as_bytes()[r.start as usize..r.end as usize],
                Shape::One,
                7,
            )
            .unwrap();
            assert_eq!(alone.states[0].time_ms, s.time_ms);
        }
        assert!(array_elements(br#"{"data":{"a":1}}"#).is_none());
        assert!(array_elements(b"[1]").is_none());
        assert!(array_elements(b"[{").is_none());
    }

    #[test]
    fn array_bounds() {
        let one = r#"{"data":{"a":1}}"#;
        let mk = |n: usize| format!("[{}]", vec![one; n].join(","));
        assert_eq!(
            parse(mk(1000).as_bytes(), Shape::OneOrArray, 1)
                .unwrap()
                .states
                .len(),
            1000
        );
        let e = parse(mk(1001).as_bytes(), Shape::OneOrArray, 1).unwrap_err();
        assert!(e.0.contains("at most 1000"), "{e}");
    }
}
