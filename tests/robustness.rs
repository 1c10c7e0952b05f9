//! No input crashes the server or gets a 5xx: arbitrary bodies, paths and query strings
//! are answered with a well-formed 4xx error (or a success), and the server stays up.

mod common;

use common::TestServer;
use proptest::prelude::*;
use reqwest::Method;

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::PUT),
        Just(Method::PATCH),
        Just(Method::DELETE)
    ]
}

/// Paths shaped like the API's, with arbitrary segments in the id positions.
fn path(channel: String, user: String) -> impl Strategy<Value = String> {
    let segment = prop_oneof![
        Just(channel),
        Just(user),
        "[0-9]{1,25}",
        "-?[0-9a-z%.]{0,12}",
    ];
    (0usize..12, segment.clone(), segment, "[a-z_=&0-9%-]{0,20}").prop_map(|(shape, a, b, q)| {
        let p = match shape {
            0 => "/v1/users".to_owned(),
            1 => format!("/v1/users/{a}"),
            2 => "/v1/sessions".to_owned(),
            3 => "/v1/sessions/current".to_owned(),
            4 => "/v1/channels".to_owned(),
            5 => format!("/v1/channels/{a}"),
            6 => format!("/v1/channels/{a}/messages"),
            7 => format!("/v1/channels/{a}/messages/{b}"),
            8 => format!("/v1/channels/{a}/members/{b}"),
            9 => format!("/v1/channels/{a}/read"),
            10 => format!("/v1/channels/{a}/events"),
            _ => "/v1/dms".to_owned(),
        };
        format!("{p}?{q}")
    })
}

/// Bodies: arbitrary bytes, arbitrary JSON values, and objects with the API's field names
/// holding arbitrary values.
fn body() -> impl Strategy<Value = Option<Vec<u8>>> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        ".{0,40}".prop_map(serde_json::Value::from),
    ];
    let value = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("text".to_owned()),
                    Just("client_id".to_owned()),
                    Just("name".to_owned()),
                    Just("kind".to_owned()),
                    Just("members".to_owned()),
                    Just("seq".to_owned()),
                    Just("role".to_owned()),
                    Just("user_id".to_owned()),
                    Just("username".to_owned()),
                    Just("password".to_owned()),
                    "[a-z]{1,8}",
                ],
                inner,
                0..5
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    prop_oneof![
        Just(None),
        prop::collection::vec(any::<u8>(), 0..200).prop_map(Some),
        value.prop_map(|v| Some(serde_json::to_vec(&v).unwrap())),
    ]
}

#[test]
fn arbitrary_requests_never_get_a_5xx() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(TestServer::start());
    let (user, channel) = rt.block_on(async {
        let user = server.client().register("fuzzer").await;
        let other = server.client().register("fuzzed").await;
        let channel = user.create_channel("fuzz", "group", &[&other]).await;
        user.send(&channel, "seed", None).await;
        (user, channel)
    });
    let user_id = user.user_id.clone();
    proptest!(ProptestConfig { cases: 400, ..ProptestConfig::default() }, |(
        m in method(),
        p in path(channel.clone(), user_id.clone()),
        b in body(),
        authed in any::<bool>(),
    )| {
        rt.block_on(async {
            let mut c = user.clone();
            if !authed {
                c.token = None;
            }
            let a = c.raw(m.clone(), &p, b.clone()).await.expect("the server answers");
            assert!(a.status.as_u16() < 500, "{m} {p} {:?} → {a:?}", b.as_ref().map(|b| String::from_utf8_lossy(b)));
            if !a.status.is_success() {
                assert!(!a.code().is_empty(), "{m} {p}: error without a code: {a:?}");
            }
        });
    });
    rt.block_on(async {
        assert_eq!(user.get("/healthz").await.status, reqwest::StatusCode::OK);
        // The fuzzer may have logged itself out: log in again to read the log.
        let login = server
            .client()
            .post(
                "/v1/sessions",
                serde_json::json!({"username": "fuzzer", "password": "password-fuzzer"}),
            )
            .await;
        let mut user = user.clone();
        user.token = Some(login.body["token"].as_str().unwrap().to_owned());
        let events = user.all_events(&channel).await;
        common::assert_gap_free(&events);
    });
    rt.block_on(server.stop());
}
