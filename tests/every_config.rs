//! Every job config shipped in `configs/` must parse and validate, data files included (for a
//! text config: the model directory and every text file, read with its label map), without a
//! warning (a TorchScript module must load and take the test set's rows). The text configs need the text assets `./dev test` installs.

use metaloop_proto::config::JobConfig;

#[test]
fn every_shipped_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("configs/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let checked = JobConfig::load_checked(&path).unwrap_or_else(|e| panic!("{e}"));
            let mut files = metaloop_common::text::check_job(&checked.config);
            files.extend(metaloop_common::torchscript::check_job(&checked.config));
            assert!(files.is_empty(), "{}: {files:#?}", path.display());
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
