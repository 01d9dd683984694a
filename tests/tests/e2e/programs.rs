//! The two programs agree: `endofm` (no libtorch) reports the same parameter counts for every
//! preset as `endofm-worker` measures on the allocated network.

use std::time::Duration;

use endofm_tests::{bin, json_lines, run};

#[test]
fn cli_and_worker_agree_on_every_preset() {
    let endofm = bin("endofm").unwrap();
    let worker = bin("endofm-worker").unwrap();
    let presets =
        json_lines(&run(&endofm, &["presets"], Duration::from_secs(30)).unwrap()).unwrap();
    assert!(presets.len() >= 2);
    for p in presets {
        let name = p["preset"].as_str().unwrap();
        let info = json_lines(
            &run(
                &worker,
                &["model", "info", "--preset", name],
                Duration::from_secs(120),
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(info[0]["params"], p["params"], "preset {name}");
        assert_eq!(
            info[0]["backbone_params"], p["backbone_params"],
            "preset {name}"
        );
        assert_eq!(info[0]["config"], p["config"], "preset {name}");
    }
}
