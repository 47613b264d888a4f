//! Debug aid: dump the pinned process and executable maps of an agent (`dump PIN_DIR`).
use aya::maps::{HashMap, Map, MapData};
use enforcer_common::*;

fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: dump PIN_DIR"));
    let procs: HashMap<_, u32, ProcState> = HashMap::try_from(Map::HashMap(
        MapData::from_pin(dir.join(MAP_PROCS)).expect("pin"),
    ))
    .expect("map");
    for (pid, st) in procs.iter().flatten() {
        println!("proc {pid} {st:?}");
    }
    let exes: HashMap<_, ExeKey, u32> = HashMap::try_from(Map::HashMap(
        MapData::from_pin(dir.join(MAP_EXES)).expect("pin"),
    ))
    .expect("map");
    for (k, id) in exes.iter().flatten() {
        println!("exe {id} {k:?}");
    }
}
