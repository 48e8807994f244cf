use lb_userspace::dataplane::{Dataplane, LoadOptions};
#[test]
fn loads() {
    let dp = Dataplane::load(&LoadOptions { ring_size: 65537, flow_table_size: 1 << 20, floor_dst_mac: [2,0,0,0,0,1] }).expect("load");
    let _ = dp.stats().expect("stats");
}
