//! Runtimes with a JIT: their generated code has no CFI, so stacks go on through it by frame
//! pointer, and its frames are named from the runtime's perf map (`/tmp/perf-PID.map`). A leak
//! driven by JavaScript or Java code names the function that drives it.

use std::process::Command;

use leakhunt_tests::*;

/// The growth entries and exit records of a process whose stacks hold a frame named `function`.
fn frames_named<'a>(entries: &'a serde_json::Value, function: &str) -> Vec<&'a serde_json::Value> {
    entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["stack"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| f["function"] == function)
        })
        .collect()
}

#[test]
fn node_buffers_held_by_a_js_function_name_it() {
    let script = fixtures_src().join("hold_buffers.js");
    let r = run(
        "node".as_ref(),
        &["--perf-basic-prof", script.to_str().unwrap()],
        &["--epoch", "100ms"],
    );
    let p = r.main();
    remove_jit_files(&p["pid"]);
    assert_eq!(r.stdout(), "kept 4020\n", "{}", r.stderr());
    assert_eq!(r.out.status.code(), Some(0), "{}", r.stderr());
    // The Buffers' backing stores: 4,020 of 4,096 bytes, malloc'ed by node's array buffer
    // allocator under the JS function (its frame named from the perf map, with the line
    // where it starts).
    let growing = frames_named(&p["growth"], "holdBuffers");
    let top = growing
        .iter()
        .max_by_key(|e| e["delta_bytes"].as_i64().unwrap())
        .unwrap_or_else(|| panic!("no growing callsite names holdBuffers:\n{}", r.stderr()));
    assert_eq!(top["verdict"], "leak", "{}", r.stderr());
    assert!(
        top["delta_bytes"].as_i64().unwrap() >= 1000 * 4096,
        "{}",
        top["delta_bytes"]
    );
    let frame = top["stack"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["function"] == "holdBuffers")
        .unwrap();
    assert!(
        frame["file"].as_str().unwrap().ends_with("hold_buffers.js"),
        "{frame}"
    );
    assert_eq!(frame["line"], line_of("hold_buffers.js", "HOLD"));
    // Below it, the JS that called it and the event loop's native frames down to main: the
    // walk went on through the JIT's frames.
    let names: Vec<&str> = top["stack"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|f| f["function"].as_str())
        .collect();
    let at = names.iter().position(|&n| n == "holdBuffers").unwrap();
    assert_eq!(names[at + 1], "tick", "{names:?}");
    assert!(names.iter().any(|n| n.contains("uv_run")), "{names:?}");
    assert!(top.get("unwind").is_none(), "{top}");
    // Every frame above it is named: node's C++ by its symbols, and V8's builtins, which it maps
    // again next to its JIT code (a mapping of /usr/bin/node that is no loaded module), by the
    // executable's symbols too.
    let stack = top["stack"].as_array().unwrap();
    let js = stack
        .iter()
        .position(|f| f["function"] == "holdBuffers")
        .unwrap();
    assert!(
        stack[..js].iter().all(|f| f["function"].is_string()),
        "{:#}",
        serde_json::json!(stack[..js])
    );
    // Every growth entry says where it starts when its stack was cut short; this run's were not.
    let text = r.stderr();
    assert!(text.contains("holdBuffers (hold_buffers.js:"), "{text}");
}

#[test]
fn java_direct_buffers_name_the_java_method() {
    let out = workspace().join("target/fixtures/java");
    std::fs::create_dir_all(&out).unwrap();
    run_ok(
        Command::new("javac")
            .arg("-d")
            .arg(&out)
            .arg(fixtures_src().join("HoldDirect.java")),
    );
    let r = run(
        "java".as_ref(),
        &[
            "-XX:+UnlockDiagnosticVMOptions",
            "-XX:+DumpPerfMapAtExit",
            "-XX:+PreserveFramePointer",
            // Methods compiled when they reach the threshold, not whenever a compiler thread
            // gets to them: how many buffers come from compiled code does not vary with load.
            "-XX:-BackgroundCompilation",
            "-cp",
            out.to_str().unwrap(),
            "HoldDirect",
        ],
        &["--epoch", "200ms", "--show-leak-kinds", "all"],
    );
    let p = r.main();
    remove_jit_files(&p["pid"]);
    assert_eq!(r.stdout(), "kept 4000\n", "{}", r.stderr());
    assert_eq!(r.out.status.code(), Some(0), "{}", r.stderr());
    // Every direct buffer is still held at exit: 4,000 x 4,096 bytes through
    // Unsafe_AllocateMemory0, exactly.
    let unsafe_records = frames_named(&p["leaks"], "Unsafe_AllocateMemory0");
    let sum = |rs: &[&serde_json::Value], k: &str| -> u64 {
        rs.iter().map(|l| l[k].as_u64().unwrap()).sum()
    };
    assert_eq!(
        (
            sum(&unsafe_records, "bytes"),
            sum(&unsafe_records, "blocks")
        ),
        (4000 * 4096, 4000),
        "{}",
        r.stderr()
    );
    // Every one of those stacks goes on through the Java frames (compiled or interpreted) to
    // the VM's call into Java, and none was cut short.
    for l in &unsafe_records {
        assert!(l.get("unwind").is_none(), "{l}");
        assert!(
            !frames_named(&serde_json::json!([l]), "JavaCalls::call_helper(JavaValue*, methodHandle const&, JavaCallArguments*, JavaThread*)").is_empty(),
            "{l}"
        );
    }
    // Once compiled (at a fixed threshold: -BackgroundCompilation), the Java method that
    // allocates is named from the perf map, under the JDK's own methods; the interpreter's
    // frames are one name for every method ("Interpreter").
    let named = frames_named(&p["leaks"], "void HoldDirect.holdDirect(int)");
    assert!(
        sum(&named, "blocks") >= 1000,
        "{} of 4000 blocks under holdDirect:\n{}",
        sum(&named, "blocks"),
        r.stderr()
    );
    // Growing once compiled (the callsite of the compiled method begins part way through the
    // run, when the JIT compiles it: `leak` or `growing` depending on when).
    let growing = frames_named(&p["growth"], "void HoldDirect.holdDirect(int)");
    assert!(
        growing
            .iter()
            .any(|e| e["verdict"] == "leak" || e["verdict"] == "growing"),
        "{}",
        r.stderr()
    );
}

#[test]
fn a_c_extensions_leak_names_the_python_code_driving_it() {
    // Debian's CPython 3.11 and an extension built against its headers.
    let out = workspace().join("target/fixtures/pyext");
    std::fs::create_dir_all(&out).unwrap();
    run_ok(
        Command::new("gcc")
            .args([
                "-g",
                "-O1",
                "-shared",
                "-fPIC",
                "-I/usr/include/python3.11",
                "-o",
            ])
            .arg(out.join("leaky_ext.cpython-311-x86_64-linux-gnu.so"))
            .arg(fixtures_src().join("leaky_ext.c")),
    );
    std::fs::copy(
        fixtures_src().join("py_driver.py"),
        out.join("py_driver.py"),
    )
    .unwrap();
    let r = run(
        "/usr/bin/python3.11".as_ref(),
        &[out.join("py_driver.py").to_str().unwrap()],
        &[],
    );
    assert_eq!(r.stdout(), "served\n", "{}", r.stderr());
    assert_eq!(r.out.status.code(), Some(0), "{}", r.stderr());
    let p = r.main();
    let leak = expect_leak(p, "leaky_ext.c", "EXT_LEAK", 300 * 48, 300);
    // Under the extension's C frame and the interpreter's call machinery: the Python functions
    // that were running, innermost first, each at the line it was on.
    let py: Vec<&(String, String, u32)> = leak
        .frames
        .iter()
        .filter(|f| f.1 == "py_driver.py")
        .collect();
    assert_eq!(
        py,
        [
            &(
                "handle_request".to_string(),
                "py_driver.py".to_string(),
                line_of("py_driver.py", "PY_KEEP")
            ),
            &(
                "serve".to_string(),
                "py_driver.py".to_string(),
                line_of("py_driver.py", "PY_SERVE")
            ),
            &(
                "<module>".to_string(),
                "py_driver.py".to_string(),
                line_of("py_driver.py", "PY_MODULE")
            ),
        ],
        "{:?}",
        leak.frames
    );
    let first_py = leak
        .frames
        .iter()
        .position(|f| f.1 == "py_driver.py")
        .unwrap();
    assert!(
        leak.frames[..first_py].iter().any(|f| f.0 == "keep"),
        "{:?}",
        leak.frames
    );
    // The scratch blocks were all freed: nothing else from the extension stays.
    let from_ext: u64 = leaks(p)
        .iter()
        .filter(|l| l.frames.iter().any(|f| f.1 == "leaky_ext.c"))
        .map(|l| l.blocks)
        .sum();
    assert_eq!(from_ext, 300);
}
