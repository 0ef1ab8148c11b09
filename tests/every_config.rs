//! Every job config shipped in `configs/` must parse and validate, data files included, without
//! a warning.

use metaloop_proto::config::JobConfig;

#[test]
fn every_shipped_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("configs/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let checked = JobConfig::load_checked(&path).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                checked.warnings.is_empty(),
                "{}: {:?}",
                path.display(),
                checked.warnings
            );
            n += 1;
        }
    }
    assert!(n >= 1, "no configs found in {}", dir.display());
}
