use std::collections::BTreeMap;

use serde_json::json;

use super::*;

/// Host interface and pod addresses.
type Parsed<'a> = (&'a str, &'a [&'a str]);
type Row = (&'static str, CniEnv, String, Result<(), AgentError>, u32);

/// A ptp + host-local result as the reference plugins print it.
fn ptp_result() -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": "veth1a2b3c4d", "mac": "6e:2c:3a:00:00:01"},
            {"name": "eth0", "mac": "6e:2c:3a:00:00:02", "sandbox": "/var/run/netns/wt1-pod"}
        ],
        "ips": [
            {"interface": 1, "address": "100.64.3.5/24", "gateway": "100.64.3.1"},
            {"interface": 1, "address": "fd00:64:0:3::5/64", "gateway": "fd00:64:0:3::1"}
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    })
}

fn conf(prev: Option<Value>) -> String {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": "weft",
        "type": "weft-cni",
        "agentSocket": "/var/run/weft/n1/agent.sock",
    });
    if let Some(prev) = prev {
        c["prevResult"] = prev;
    }
    c.to_string()
}

fn env_of(vars: &[(&str, &str)]) -> Result<CniEnv, CniError> {
    let map: BTreeMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    CniEnv::from_vars(|k| map.get(k).cloned())
}

fn add_env() -> CniEnv {
    env_of(&[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/var/run/netns/wt1-pod"),
        ("CNI_IFNAME", "eth0"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=api",
        ),
    ])
    .expect("valid env")
}

/// Records requests and answers with a fixed result.
struct FakeAgent {
    answer: Result<(), AgentError>,
    calls: Vec<(String, Request)>,
}

impl FakeAgent {
    fn answering(answer: Result<(), AgentError>) -> Self {
        Self {
            answer,
            calls: Vec::new(),
        }
    }
}

impl Agent for FakeAgent {
    fn call(&mut self, socket: &str, request: &Request) -> Result<(), AgentError> {
        self.calls.push((socket.to_string(), request.clone()));
        self.answer.clone()
    }
}

/// Key/value pairs (env vars, `CNI_ARGS`) as a table cell.
type Pairs<'a> = &'a [(&'a str, &'a str)];
/// A result compared by error code only.
type Coded<T> = Result<T, u32>;

#[test]
fn cni_args_table() {
    let rows: &[(&str, Coded<Pairs>)] = &[
        ("", Ok(&[])),
        ("K8S_POD_NAME=a", Ok(&[("K8S_POD_NAME", "a")])),
        (
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p",
            Ok(&[
                ("IgnoreUnknown", "1"),
                ("K8S_POD_NAMESPACE", "ns"),
                ("K8S_POD_NAME", "p"),
            ]),
        ),
        ("A=1;;B=", Ok(&[("A", "1"), ("B", "")])),
        ("A=x=y", Ok(&[("A", "x=y")])),
        ("A=1;oops", Err(code::INVALID_ENV)),
    ];
    for (text, want) in rows {
        let got = parse_cni_args(text).map_err(|e| e.code);
        let want = want.map(|pairs| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect::<BTreeMap<_, _>>()
        });
        assert_eq!(got, want, "CNI_ARGS {text:?}");
    }
}

#[test]
fn env_table() {
    let rows: &[(Pairs, Coded<Command>)] = &[
        (&[("CNI_COMMAND", "VERSION")], Ok(Command::Version)),
        (&[], Err(code::INVALID_ENV)),
        (&[("CNI_COMMAND", "GC")], Err(code::INVALID_ENV)),
        (
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "eth0"),
            ],
            Err(code::INVALID_ENV), // no CNI_NETNS
        ),
        (
            &[
                ("CNI_COMMAND", "DEL"),
                ("CNI_CONTAINERID", "c"),
                ("CNI_IFNAME", "eth0"),
            ],
            Ok(Command::Del), // DEL may come without netns
        ),
        (
            &[("CNI_COMMAND", "DEL"), ("CNI_IFNAME", "eth0")],
            Err(code::INVALID_ENV), // no container id
        ),
        (
            &[
                ("CNI_COMMAND", "CHECK"),
                ("CNI_CONTAINERID", "c"),
                ("CNI_NETNS", "/var/run/netns/x"),
                ("CNI_IFNAME", "eth0"),
            ],
            Ok(Command::Check),
        ),
    ];
    for (vars, want) in rows {
        let got = env_of(vars).map(|e| e.command).map_err(|e| e.code);
        assert_eq!(&got, want, "env {vars:?}");
    }
}

#[test]
fn netconf_table() {
    let rows: &[(String, Result<(), u32>)] = &[
        (conf(None), Ok(())),
        (conf(Some(ptp_result())), Ok(())),
        (
            json!({"cniVersion": "0.4.0", "name": "n", "type": "weft-cni"}).to_string(),
            Ok(()),
        ),
        (
            json!({"cniVersion": "0.3.1", "name": "n", "type": "weft-cni"}).to_string(),
            Err(code::INCOMPATIBLE_VERSION),
        ),
        (json!({"name": "n"}).to_string(), Err(code::DECODE_FAILURE)),
        ("not json".to_string(), Err(code::DECODE_FAILURE)),
    ];
    for (text, want) in rows {
        let got = NetConf::parse(text).map(|_| ()).map_err(|e| e.code);
        assert_eq!(&got, want, "config {text}");
    }
}

#[test]
fn prev_result_table() {
    let with_host_ip = json!({
        "interfaces": [{"name": "vethX"}, {"name": "eth0", "sandbox": "/x"}],
        "ips": [{"interface": 0, "address": "100.64.0.1/32"}, {"interface": 1, "address": "100.64.0.9/24"}]
    });
    let without_index = json!({
        "interfaces": [{"name": "eth0", "sandbox": "/x"}, {"name": "vethY", "sandbox": ""}],
        "ips": [{"address": "fd00::9/64"}]
    });
    let rows: &[(Value, Coded<Parsed>)] = &[
        (
            ptp_result(),
            Ok(("veth1a2b3c4d", &["100.64.3.5/24", "fd00:64:0:3::5/64"])),
        ),
        (with_host_ip, Ok(("vethX", &["100.64.0.9/24"]))),
        (without_index, Ok(("vethY", &["fd00::9/64"]))),
        (
            json!({"interfaces": [{"name": "eth0", "sandbox": "/x"}], "ips": [{"address": "100.64.0.9/24"}]}),
            Err(code::INVALID_CONFIG), // no host side
        ),
        (
            json!({"interfaces": [{"name": "veth"}], "ips": []}),
            Err(code::INVALID_CONFIG), // no address
        ),
        (
            json!({"interfaces": [{"name": "veth"}], "ips": [{"address": "100.64.0.300/24"}]}),
            Err(code::DECODE_FAILURE),
        ),
        (json!({"interfaces": 3}), Err(code::DECODE_FAILURE)),
    ];
    for (value, want) in rows {
        let got = PrevResult::from_value(value).map_err(|e| e.code);
        let want = want.map(|(host, addrs)| PrevResult {
            host_ifname: host.to_string(),
            addresses: addrs.iter().map(|a| a.parse().expect("cidr")).collect(),
        });
        assert_eq!(got, want, "prevResult {value}");
    }
}

#[test]
fn add_registers_endpoint_and_echoes_prev_result() {
    let mut agent = FakeAgent::answering(Ok(()));
    let out = run(&add_env(), &conf(Some(ptp_result())), &mut agent).expect("ADD succeeds");
    let printed: Value = serde_json::from_str(&out.expect("ADD prints")).expect("json");
    assert_eq!(printed, ptp_result());
    let (socket, request) = &agent.calls[0];
    assert_eq!(socket, "/var/run/weft/n1/agent.sock");
    assert_eq!(
        request,
        &Request::CniAdd(CniEndpoint {
            container_id: "c1".into(),
            netns: "/var/run/netns/wt1-pod".into(),
            ifname: "eth0".into(),
            host_ifname: "veth1a2b3c4d".into(),
            pod_name: "api".into(),
            pod_namespace: "shop".into(),
            addresses: vec![
                "100.64.3.5/24".parse().expect("cidr"),
                "fd00:64:0:3::5/64".parse().expect("cidr"),
            ],
        })
    );
}

#[test]
fn add_errors_table() {
    let no_pod_name = {
        let mut env = add_env();
        env.args.remove("K8S_POD_NAME");
        env
    };
    let no_socket = json!({"cniVersion": "1.0.0", "name": "weft", "type": "weft-cni", "prevResult": ptp_result()}).to_string();
    let rows: Vec<Row> = vec![
        (
            "no prevResult",
            add_env(),
            conf(None),
            Ok(()),
            code::INVALID_CONFIG,
        ),
        (
            "no pod name",
            no_pod_name,
            conf(Some(ptp_result())),
            Ok(()),
            code::INVALID_ENV,
        ),
        (
            "no socket",
            add_env(),
            no_socket,
            Ok(()),
            code::INVALID_CONFIG,
        ),
        (
            "agent down",
            add_env(),
            conf(Some(ptp_result())),
            Err(AgentError::Unreachable("refused".into())),
            code::TRY_AGAIN_LATER,
        ),
        (
            "agent refuses",
            add_env(),
            conf(Some(ptp_result())),
            Err(AgentError::Refused(ApiError::new(
                ErrorCode::Invalid,
                "no Endpoint shop/api",
            ))),
            code::AGENT_REFUSED,
        ),
    ];
    for (what, env, stdin, answer, want) in rows {
        let mut agent = FakeAgent::answering(answer);
        let got = run(&env, &stdin, &mut agent).map_err(|e| e.code);
        assert_eq!(got, Err(want), "{what}");
    }
}

#[test]
fn del_is_idempotent_table() {
    let env = env_of(&[
        ("CNI_COMMAND", "DEL"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_IFNAME", "eth0"),
    ])
    .expect("env");
    let rows: &[(Result<(), AgentError>, Coded<()>)] = &[
        (Ok(()), Ok(())),
        (Err(AgentError::Unreachable("ENOENT".into())), Ok(())),
        (
            Err(AgentError::Refused(ApiError::new(
                ErrorCode::NotFound,
                "unknown endpoint c1/eth0",
            ))),
            Ok(()),
        ),
        (
            // The wording does not matter, only the code.
            Err(AgentError::Refused(ApiError::new(
                ErrorCode::Internal,
                "endpoint not found",
            ))),
            Err(code::AGENT_REFUSED),
        ),
        (
            Err(AgentError::Refused(ApiError::new(
                ErrorCode::Overloaded,
                "too many connections",
            ))),
            Err(code::TRY_AGAIN_LATER),
        ),
    ];
    for (answer, want) in rows {
        let mut agent = FakeAgent::answering(answer.clone());
        let got = run(&env, &conf(None), &mut agent)
            .map(|out| assert_eq!(out, None, "DEL prints nothing"))
            .map_err(|e| e.code);
        assert_eq!(&got, want, "agent answered {answer:?}");
        assert_eq!(
            agent.calls[0].1,
            Request::CniDel(CniRef {
                container_id: "c1".into(),
                ifname: "eth0".into()
            })
        );
    }
}

#[test]
fn version_and_error_json() {
    let env = env_of(&[("CNI_COMMAND", "VERSION")]).expect("env");
    let out = run(&env, "", &mut FakeAgent::answering(Ok(()))).expect("VERSION");
    let v: Value = serde_json::from_str(&out.expect("prints")).expect("json");
    assert_eq!(
        v,
        json!({"cniVersion": "1.0.0", "supportedVersions": ["0.4.0", "1.0.0"]})
    );

    let e: Value =
        serde_json::from_str(&CniError::new(7, "bad", "why").to_json("0.4.0")).expect("json");
    assert_eq!(
        e,
        json!({"cniVersion": "0.4.0", "code": 7, "msg": "bad", "details": "why"})
    );
    assert_eq!(error_version(r#"{"cniVersion":"0.4.0"}"#), "0.4.0");
    assert_eq!(error_version("garbage"), "1.0.0");
}
