//! TorchScript modules as models: the MLP exported by `scripts/export_torchscript.py` computes
//! what the native MLP computes, bit for bit (forward and gradients), trains in place by name,
//! and every module `validate` must refuse is refused with a message that names the file.
//! The modules are in `tests/data/torchscript/` (`scripts/make_torchscript_fixtures.py`).

use metaloop_common::model::{self, load_bundle, to_bundle, Inputs, Model};
use metaloop_common::torchscript::{self, TorchScriptError, TorchScriptModel};
use metaloop_proto::proto::{ModelSpec, ModuleBytes};
use std::path::PathBuf;
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data/torchscript")
        .join(name)
}

fn native_spec() -> ModelSpec {
    ModelSpec::Mlp {
        inputs: 64,
        hidden: vec![32],
        classes: 10,
        dropout: 0.0,
    }
}

fn batch(seed: i64, rows: i64) -> (Inputs, Tensor) {
    tch::manual_seed(seed);
    let x = Tensor::rand([rows, 64], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(10, [rows], (Kind::Int64, Device::Cpu));
    (Inputs::Dense(x), y)
}

fn grads(m: &dyn Model, x: &Inputs, y: &Tensor) -> Vec<Tensor> {
    let loss = m.forward(x).cross_entropy_for_logits(y);
    Tensor::run_backward(&[&loss], m.parameters(), false, false)
}

#[test]
fn the_exported_mlp_is_the_native_mlp_bit_for_bit() {
    let (spec, initial, ts) = torchscript::spec(&fixture("mlp.pt"), 10).expect("load mlp.pt");
    // Its own initial values are the native MLP's for job seed 0, under the same names.
    assert_eq!(initial, model::init_params(&native_spec(), 0));
    assert_eq!(ts.names(), ["l0.weight", "l0.bias", "l1.weight", "l1.bias"]);
    assert_eq!(
        model::layout(&spec).expect("layout"),
        model::layout(&native_spec()).expect("layout")
    );
    let native = model::build(&native_spec(), &initial, Device::Cpu).expect("native");
    let (x, y) = batch(1, 33);
    assert!(ts.forward(&x).equal(&native.forward(&x)), "logits differ");
    for (a, b) in grads(&ts, &x, &y).iter().zip(grads(native.as_ref(), &x, &y)) {
        assert!(a.equal(&b), "gradients differ");
    }
    // Built from its spec (as a worker does, from the bytes it was sent) with other parameters:
    // the module's own tensors hold them.
    let other = model::init_params(&native_spec(), 7);
    let built = model::build(&spec, &other, Device::Cpu).expect("build from spec");
    assert_eq!(to_bundle(built.as_ref()).expect("bundle"), other);
    let native7 = model::build(&native_spec(), &other, Device::Cpu).expect("native");
    assert!(built.forward(&x).equal(&native7.forward(&x)));
}

#[test]
fn an_in_place_update_of_a_parameter_changes_the_module() {
    let (_, initial, ts) = torchscript::spec(&fixture("mlp.pt"), 10).expect("load");
    let (x, _) = batch(2, 4);
    let before = ts.forward(&x);
    tch::no_grad(|| {
        let mut w = ts.parameters()[3].shallow_clone();
        let _ = w.f_add_scalar_(1.0).expect("add");
    });
    let after = ts.forward(&x);
    assert!((after - before - 1.0).abs().max().double_value(&[]) < 1e-5);
    load_bundle(&ts, &initial).expect("load back");
    ts.set_train(true);
    ts.set_train(false);
    assert_eq!(to_bundle(&ts).expect("bundle"), initial);
}

#[test]
fn a_spec_without_its_module_or_with_another_layout_does_not_build() {
    let (spec, initial, _) = torchscript::spec(&fixture("mlp.pt"), 10).expect("load");
    let ModelSpec::TorchScript {
        sha256,
        size,
        layout,
        classes,
        ..
    } = spec.clone()
    else {
        panic!("not a TorchScript spec");
    };
    let missing = ModelSpec::TorchScript {
        sha256,
        size,
        layout: layout.clone(),
        classes,
        module: ModuleBytes(None),
    };
    let e = model::build(&missing, &initial, Device::Cpu)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("has not been received"), "{e}");
    let mut renamed = layout;
    renamed[0].0 = "first.weight".into();
    let ModelSpec::TorchScript { module, .. } = spec else {
        unreachable!()
    };
    let lying = ModelSpec::TorchScript {
        sha256,
        size,
        layout: renamed,
        classes,
        module,
    };
    // The bundle fits the lying layout, but the module's own parameters do not.
    let mut params = initial.clone();
    params.tensors[0].name = "first.weight".into();
    let e = model::build(&lying, &params, Device::Cpu)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("not those the job's spec lists"), "{e}");
}

/// What `validate` says about a module: the load error, or the forward check's on 3 rows of
/// 64 features and 10 classes.
fn refusal(name: &str) -> String {
    let path = fixture(name);
    let e = match torchscript::spec(&path, 10) {
        Err(e) => e,
        Ok((_, _, m)) => m
            .check_forward(&batch(3, 3).0, 10)
            .expect_err("the forward check must refuse it"),
    };
    let msg = e.to_string();
    assert!(msg.contains(name), "the error must name the file: {msg}");
    match (name, &e) {
        ("garbage.pt", TorchScriptError::NotTorchScript { .. })
        | ("no-params.pt", TorchScriptError::NoParameters { .. })
        | ("f64.pt", TorchScriptError::Dtype { .. })
        | ("two-inputs.pt" | "tuple.pt", TorchScriptError::Forward { .. })
        | ("three-classes.pt", TorchScriptError::Output { .. }) => {}
        _ => panic!("{name}: unexpected error {e:?}"),
    }
    msg
}

#[test]
fn modules_metaloop_cannot_train_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().expect("tmp");
    let garbage = dir.path().join("garbage.pt");
    std::fs::write(&garbage, b"not a zip archive").expect("write");
    let e =
        TorchScriptModel::load(b"not a zip archive", Device::Cpu, &garbage.display().to_string()).expect_err("refused");
    assert!(matches!(e, TorchScriptError::NotTorchScript { .. }), "{e}");
    assert!(refusal("no-params.pt").contains("no parameters"));
    assert!(refusal("f64.pt").contains("Double"));
    assert!(refusal("two-inputs.pt").contains("forward(features Float [3, 64]) failed"));
    assert!(refusal("tuple.pt").contains("forward(features Float [3, 64]) failed"));
    let three = refusal("three-classes.pt");
    assert!(three.contains("[3, 3]") && three.contains("[3, 10]"), "{three}");
    // libtorch's backtrace is left out of the message.
    assert!(!refusal("two-inputs.pt").contains("frame #"));
}
