//! The API frame decoder on both ends of the unix socket: the agent reads `Request` frames
//! (and loads the policy an `apply` request carries), the CLI reads `Reply` frames and prints
//! them (as JSON with `--json`). The input is a byte stream of any number of frames.
#![no_main]

use enforcer_agent::{
    api::{Reply, Request, read_frame, reply, request},
    policy,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    while let Ok(Some(req)) = read_frame::<Request>(&mut r) {
        if let Some(request::Kind::Apply(a)) = req.kind {
            let _ = policy::load(&a.name, &a.policy);
        }
    }
    let mut r = data;
    while let Ok(Some(rep)) = read_frame::<Reply>(&mut r) {
        let _ = match rep.kind {
            Some(reply::Kind::Status(s)) => serde_json::to_string(&s),
            Some(reply::Kind::Identities(i)) => serde_json::to_string(&i),
            Some(reply::Kind::Explain(d) | reply::Kind::Event(d)) => serde_json::to_string(&d),
            Some(reply::Kind::Apply(a)) => serde_json::to_string(&a),
            Some(reply::Kind::Error(e)) => serde_json::to_string(&e),
            Some(reply::Kind::Grant(g)) => serde_json::to_string(&g),
            Some(reply::Kind::Grants(g)) => serde_json::to_string(&g),
            Some(reply::Kind::Learned(l)) => serde_json::to_string(&l),
            Some(reply::Kind::Diff(d)) => serde_json::to_string(&d),
            None => Ok(String::new()),
        };
    }
});
