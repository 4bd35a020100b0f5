//! pprof's format (github.com/google/pprof, `proto/profile.proto`): a [`Profile`] as the
//! gzipped protocol buffer that `go tool pprof` and every pprof viewer reads. The messages are
//! written here with prost's derive (field numbers as in profile.proto); prost does the wire
//! format, flate2 the gzip.
//!
//! The profile is a heap profile as Go writes them: sample types `alloc_objects`/count,
//! `alloc_space`/bytes, `inuse_objects`/count, `inuse_space`/bytes (the default). Each callsite
//! is one sample; each return address one location, with one line per function there, the
//! inlined ones first and the function they were inlined into last (as pprof expects); each
//! module one mapping with its path and build-id (hex), marked as symbolized so that pprof
//! does not look the addresses up again.

use std::collections::HashMap;
use std::io::Write;

use crate::profile::{Profile, Values};

/// profile.proto's messages (the fields leakhunt writes).
pub mod proto {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Profile {
        #[prost(message, repeated, tag = "1")]
        pub sample_type: Vec<ValueType>,
        #[prost(message, repeated, tag = "2")]
        pub sample: Vec<Sample>,
        #[prost(message, repeated, tag = "3")]
        pub mapping: Vec<Mapping>,
        #[prost(message, repeated, tag = "4")]
        pub location: Vec<Location>,
        #[prost(message, repeated, tag = "5")]
        pub function: Vec<Function>,
        /// `string_table[0]` is always "".
        #[prost(string, repeated, tag = "6")]
        pub string_table: Vec<String>,
        #[prost(int64, tag = "7")]
        pub drop_frames: i64,
        #[prost(int64, tag = "8")]
        pub keep_frames: i64,
        #[prost(int64, tag = "9")]
        pub time_nanos: i64,
        #[prost(int64, tag = "10")]
        pub duration_nanos: i64,
        #[prost(message, optional, tag = "11")]
        pub period_type: Option<ValueType>,
        #[prost(int64, tag = "12")]
        pub period: i64,
        #[prost(int64, repeated, tag = "13")]
        pub comment: Vec<i64>,
        #[prost(int64, tag = "14")]
        pub default_sample_type: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ValueType {
        #[prost(int64, tag = "1")]
        pub r#type: i64,
        #[prost(int64, tag = "2")]
        pub unit: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Sample {
        /// The leaf first.
        #[prost(uint64, repeated, tag = "1")]
        pub location_id: Vec<u64>,
        #[prost(int64, repeated, tag = "2")]
        pub value: Vec<i64>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Mapping {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub memory_start: u64,
        #[prost(uint64, tag = "3")]
        pub memory_limit: u64,
        #[prost(uint64, tag = "4")]
        pub file_offset: u64,
        #[prost(int64, tag = "5")]
        pub filename: i64,
        #[prost(int64, tag = "6")]
        pub build_id: i64,
        #[prost(bool, tag = "7")]
        pub has_functions: bool,
        #[prost(bool, tag = "8")]
        pub has_filenames: bool,
        #[prost(bool, tag = "9")]
        pub has_line_numbers: bool,
        #[prost(bool, tag = "10")]
        pub has_inline_frames: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Location {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(uint64, tag = "2")]
        pub mapping_id: u64,
        #[prost(uint64, tag = "3")]
        pub address: u64,
        /// The inlined functions first, the function they were inlined into last.
        #[prost(message, repeated, tag = "4")]
        pub line: Vec<Line>,
        #[prost(bool, tag = "5")]
        pub is_folded: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Line {
        #[prost(uint64, tag = "1")]
        pub function_id: u64,
        #[prost(int64, tag = "2")]
        pub line: i64,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Function {
        #[prost(uint64, tag = "1")]
        pub id: u64,
        #[prost(int64, tag = "2")]
        pub name: i64,
        #[prost(int64, tag = "3")]
        pub system_name: i64,
        #[prost(int64, tag = "4")]
        pub filename: i64,
        #[prost(int64, tag = "5")]
        pub start_line: i64,
    }
}

/// The string table being built: each string once, "" at 0.
struct Strings {
    table: Vec<String>,
    index: HashMap<String, i64>,
}

impl Strings {
    fn new() -> Strings {
        Strings {
            table: vec![String::new()],
            index: HashMap::from([(String::new(), 0)]),
        }
    }

    fn id(&mut self, s: &str) -> i64 {
        if let Some(&i) = self.index.get(s) {
            return i;
        }
        let i = self.table.len() as i64;
        self.table.push(s.to_string());
        self.index.insert(s.to_string(), i);
        i
    }
}

/// Lowercase hex, as pprof and `file`/`readelf` show build-ids.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The profile as profile.proto's message.
pub fn message(p: &Profile) -> proto::Profile {
    let mut s = Strings::new();
    let sample_type = Values::TYPES
        .iter()
        .map(|(t, u)| proto::ValueType {
            r#type: s.id(t),
            unit: s.id(u),
        })
        .collect();
    // A mapping says its functions, files, lines and inlined frames are known when every frame
    // in it has a function (pprof then leaves it alone; else it may look the rest up itself).
    let mut named = vec![true; p.mappings.len()];
    for site in &p.sites {
        for l in &site.frames {
            if let Some(m) = l.mapping {
                named[m as usize] &= l.frame.function.is_some();
            }
        }
    }
    let mapping = p
        .mappings
        .iter()
        .enumerate()
        .map(|(i, m)| proto::Mapping {
            id: i as u64 + 1,
            memory_start: m.start,
            memory_limit: m.limit,
            file_offset: m.file_offset,
            filename: s.id(&m.path),
            build_id: s.id(&hex(&m.build_id)),
            has_functions: named[i],
            has_filenames: named[i],
            has_line_numbers: named[i],
            has_inline_frames: named[i],
        })
        .collect();
    let mut functions: Vec<proto::Function> = Vec::new();
    let mut function_ids: HashMap<(i64, i64, i64), u64> = HashMap::new();
    let mut locations: Vec<proto::Location> = Vec::new();
    // A location is its mapping, address and lines: the same address always has the same lines,
    // except where a stack was cut below main inside a group of inlined frames.
    type LocationKey = (u64, u64, Vec<(u64, i64)>);
    let mut location_ids: HashMap<LocationKey, u64> = HashMap::new();
    let mut samples = Vec::with_capacity(p.sites.len());
    for site in &p.sites {
        let mut ids = Vec::new();
        let mut i = 0;
        while i < site.frames.len() {
            let first = &site.frames[i];
            let mut j = i;
            let mut lines = Vec::new();
            while j < site.frames.len() && site.frames[j].pos == first.pos {
                let f = &site.frames[j].frame;
                if let Some(name) = &f.function {
                    let key = (
                        s.id(name),
                        s.id(f.mangled.as_deref().unwrap_or(name)),
                        s.id(f.file.as_deref().unwrap_or("")),
                    );
                    let id = *function_ids.entry(key).or_insert_with(|| {
                        functions.push(proto::Function {
                            id: functions.len() as u64 + 1,
                            name: key.0,
                            system_name: key.1,
                            filename: key.2,
                            start_line: 0,
                        });
                        functions.len() as u64
                    });
                    lines.push(proto::Line {
                        function_id: id,
                        line: i64::from(f.line.unwrap_or(0)),
                    });
                }
                j += 1;
            }
            let mapping_id = first.mapping.map_or(0, |m| u64::from(m) + 1);
            let address = p.address(first);
            let key = lines.iter().map(|l| (l.function_id, l.line)).collect();
            let id = *location_ids
                .entry((mapping_id, address, key))
                .or_insert_with(|| {
                    locations.push(proto::Location {
                        id: locations.len() as u64 + 1,
                        mapping_id,
                        address,
                        line: lines,
                        is_folded: false,
                    });
                    locations.len() as u64
                });
            ids.push(id);
            i = j;
        }
        samples.push(proto::Sample {
            location_id: ids,
            value: site.values.as_array().to_vec(),
        });
    }
    let mut comment = vec![s.id(&format!("leakhunt: {}", p.what))];
    if !p.argv.is_empty() {
        comment.push(s.id(&format!("pid {}: {}", p.pid, p.argv.join(" "))));
    }
    let period_type = Some(proto::ValueType {
        r#type: s.id("space"),
        unit: s.id("bytes"),
    });
    let default_sample_type = s.id("inuse_space");
    proto::Profile {
        sample_type,
        sample: samples,
        mapping,
        location: locations,
        function: functions,
        drop_frames: 0,
        keep_frames: 0,
        time_nanos: p.time_nanos,
        duration_nanos: 0,
        period_type,
        // Every allocation is recorded: no sampling.
        period: 1,
        comment,
        default_sample_type,
        string_table: s.table,
    }
}

/// The profile as a pprof file: the message, gzipped.
pub fn render(p: &Profile) -> std::io::Result<Vec<u8>> {
    use prost::Message as _;
    let bytes = message(p).encode_to_vec();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&bytes)?;
    gz.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::profile::{Located, Mapping, Site};
    use crate::report::Frame;
    use prost::Message as _;

    fn frame(function: &str, line: u32, offset: u64, inlined: bool) -> Frame {
        Frame {
            function: Some(function.into()),
            mangled: None,
            file: Some("/src/a.c".into()),
            line: Some(line),
            module: Some("/bin/a".into()),
            offset,
            address: 0,
            inlined,
        }
    }

    #[test]
    fn inlined_functions_are_lines_of_one_location_and_everything_round_trips() {
        let at = |pos, f| Located {
            pos,
            mapping: Some(0),
            frame: f,
        };
        let p = Profile {
            pid: 7,
            argv: vec!["a".into()],
            what: "test".into(),
            time_nanos: 5,
            mappings: vec![Mapping {
                path: "/bin/a".into(),
                build_id: vec![0xab, 0x01],
                start: 0x1000,
                limit: 0x2000,
                file_offset: 0x1000,
                bias: 0,
            }],
            sites: vec![
                Site {
                    frames: vec![
                        at(0, frame("grow", 3, 0x1100, true)),
                        at(0, frame("leak", 9, 0x1100, false)),
                        at(1, frame("main", 20, 0x1200, false)),
                    ],
                    values: Values {
                        alloc_objects: 2,
                        alloc_space: 96,
                        inuse_objects: 1,
                        inuse_space: 48,
                    },
                },
                Site {
                    frames: vec![at(1, frame("main", 20, 0x1200, false))],
                    values: Values {
                        alloc_objects: 1,
                        alloc_space: 8,
                        ..Values::default()
                    },
                },
            ],
        };
        let bytes = render(&p).unwrap();
        let mut raw = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&bytes[..]), &mut raw)
            .unwrap();
        let m = proto::Profile::decode(&raw[..]).unwrap();
        let st = |i: i64| m.string_table[i as usize].as_str();
        assert_eq!(st(0), "");
        let types: Vec<(&str, &str)> = m
            .sample_type
            .iter()
            .map(|t| (st(t.r#type), st(t.unit)))
            .collect();
        assert_eq!(types, Values::TYPES);
        assert_eq!(st(m.default_sample_type), "inuse_space");
        assert_eq!(m.sample.len(), 2);
        assert_eq!(m.sample[0].value, [2, 96, 1, 48]);
        assert_eq!(m.sample[0].location_id, [1, 2]);
        // main's location is shared.
        assert_eq!(m.sample[1].location_id, [2]);
        assert_eq!(m.location.len(), 2);
        let names = |l: &proto::Location| -> Vec<(&str, i64)> {
            l.line
                .iter()
                .map(|x| (st(m.function[x.function_id as usize - 1].name), x.line))
                .collect()
        };
        assert_eq!(names(&m.location[0]), [("grow", 3), ("leak", 9)]);
        assert_eq!(m.location[0].address, 0x10ff);
        assert_eq!(m.location[0].mapping_id, 1);
        assert_eq!(names(&m.location[1]), [("main", 20)]);
        assert_eq!(m.mapping.len(), 1);
        assert_eq!(st(m.mapping[0].build_id), "ab01");
        assert_eq!(st(m.mapping[0].filename), "/bin/a");
        assert!(m.mapping[0].has_functions && m.mapping[0].has_inline_frames);
        assert_eq!(m.time_nanos, 5);
        assert_eq!(st(m.comment[0]), "leakhunt: test");
    }
}
