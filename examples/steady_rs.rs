// The steady-load example in Rust (see steady.c): an LRU cache (HashMap + VecDeque of String)
// that fills and stays full, per-request String temporaries, and a login path whose
// remember_session() leaks a Box per login (Box::leak: nothing ever frees it). --fixed drops it.
//   steady_rs [--seconds N] [--rate REQUESTS_PER_S] [--fixed]
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

struct Session {
    user: u32,
    _token: [u8; 40],
}

#[inline(never)]
fn remember_session(user: u32, fixed: bool) -> u32 {
    let s = Box::new(Session {
        user,
        _token: [0; 40],
    });
    if fixed {
        std::hint::black_box(&s).user
    } else {
        // Kept nowhere, freed never.
        std::hint::black_box(Box::leak(s)).user
    }
}

struct Cache {
    map: HashMap<u32, String>,
    order: VecDeque<u32>,
    cap: usize,
}

impl Cache {
    #[inline(never)]
    fn lookup(&mut self, key: u32) -> usize {
        if let Some(v) = self.map.get(&key) {
            return v.len();
        }
        if self.map.len() == self.cap {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        let v = std::iter::repeat_n(char::from(b'a' + (key % 26) as u8), 200).collect::<String>();
        let n = v.len();
        self.map.insert(key, v);
        self.order.push_back(key);
        n
    }
}

#[inline(never)]
fn handle_request(line: &str, cache: &mut Cache, fixed: bool) -> usize {
    let mut parts = line.split(' ');
    let verb = parts.next().unwrap_or("").to_string(); // temporaries
    let key: u32 = parts.next().and_then(|k| k.parse().ok()).unwrap_or(0) % 600;
    let reply = format!("200 {}", cache.lookup(key));
    if verb == "LOGIN" {
        std::hint::black_box(remember_session(key, fixed));
    }
    reply.len()
}

fn main() {
    let (mut seconds, mut rate, mut fixed) = (8.0f64, 2000.0f64, false);
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--seconds" if i + 1 < args.len() => {
                i += 1;
                seconds = args[i].parse().unwrap_or(seconds)
            }
            "--rate" if i + 1 < args.len() => {
                i += 1;
                rate = args[i].parse().unwrap_or(rate)
            }
            "--fixed" => fixed = true,
            _ => {
                eprintln!("usage: {} [--seconds N] [--rate R] [--fixed]", args[0]);
                std::process::exit(2);
            }
        }
        i += 1;
    }
    let mut cache = Cache {
        map: HashMap::with_capacity(1200),
        order: VecDeque::with_capacity(600),
        cap: 600,
    };
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let start = Instant::now();
    let tick = 0.005;
    let (mut done, mut bytes) = (0u64, 0usize);
    let mut t = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        let due = ((t + 1) as f64 * tick * rate) as u64;
        while done < due {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let verb = if done % 20 == 19 { "LOGIN" } else { "GET" };
            let line = format!("{verb} {}", (rng >> 16) as u32);
            bytes += handle_request(&line, &mut cache, fixed);
            done += 1;
        }
        let until = start + Duration::from_secs_f64((t + 1) as f64 * tick);
        if let Some(d) = until.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        t += 1;
    }
    println!("{done} requests, {bytes} bytes of replies");
}
