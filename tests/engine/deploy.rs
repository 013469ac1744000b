//! What ships, read and run: `deploy/template.yaml` keeps the settings chains depend on
//! (recursion allowed, no async retries, an on-failure destination, reserved concurrency, a
//! timeout that is `hop_timeout`, schedules whose input the binary's own event parser accepts,
//! IAM that names its resources), the dashboard in it is `dashboards/`, the workflows pin their
//! actions and push what Lambda accepts, the Dockerfile builds with `scripts/build-bootstrap`;
//! and that release binary needs no glibc newer than Lambda's `provided:al2023` and serves the
//! template's scheduled `start` to the end under the Runtime API emulator. The linters
//! (hadolint, cfn-lint, checkov, actionlint) run in `scripts/lint-deploy`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use baton::config::Config;
use baton::engine::event::Event;
use baton::sql::{Params, Stmt};
use serde_json::{Value as J, json};

use crate::emulator;
use crate::fakes::FakeSes;
use crate::support::{Backend, fresh_store};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// YAML as CloudFormation reads it: short-form intrinsics (`!Ref`, `!Sub`, `!GetAtt A.B`, ...)
/// become their long JSON form.
fn cfn_json(value: serde_yaml_ng::Value) -> J {
    use serde_yaml_ng::Value as Y;
    match value {
        Y::Null => J::Null,
        Y::Bool(b) => J::Bool(b),
        Y::Number(n) => serde_json::to_value(n).unwrap(),
        Y::String(s) => J::String(s),
        Y::Sequence(items) => J::Array(items.into_iter().map(cfn_json).collect()),
        Y::Mapping(map) => J::Object(
            map.into_iter().map(|(k, v)| (k.as_str().expect("string keys").to_owned(), cfn_json(v))).collect(),
        ),
        Y::Tagged(tagged) => {
            let tag = tagged.tag.to_string();
            let name = tag.trim_start_matches('!');
            let inner = cfn_json(tagged.value);
            match name {
                "Ref" => json!({ "Ref": inner }),
                "Condition" => json!({ "Condition": inner }),
                "GetAtt" => match inner {
                    J::String(s) => {
                        let (resource, attribute) = s.split_once('.').expect("!GetAtt Resource.Attribute");
                        json!({ "Fn::GetAtt": [resource, attribute] })
                    }
                    other => json!({ "Fn::GetAtt": other }),
                },
                other => json!({ format!("Fn::{other}"): inner }),
            }
        }
    }
}

fn template(path: &str) -> J {
    cfn_json(serde_yaml_ng::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}")))
}

/// The parameters' defaults, the pseudo parameters, and `given` for those without a default.
fn parameters(t: &J, given: &[(&str, &str)]) -> HashMap<String, String> {
    let mut values: HashMap<String, String> = t["Parameters"]
        .as_object()
        .unwrap()
        .iter()
        .filter_map(|(name, p)| {
            let default = p.get("Default")?;
            Some((name.clone(), default.as_str().map_or_else(|| default.to_string(), str::to_owned)))
        })
        .collect();
    for (name, value) in [
        ("AWS::StackName", "baton-newsletter"),
        ("AWS::Region", "eu-west-1"),
        ("AWS::AccountId", "123456789012"),
        ("AWS::Partition", "aws"),
    ]
    .iter()
    .chain(given)
    {
        values.insert((*name).to_owned(), (*value).to_owned());
    }
    values
}

/// A value as CloudFormation would resolve it, from `params`: parameters by name, resources'
/// stand-ins by logical id (`Ref`) or `Id.Attribute` (`Fn::GetAtt`), conditions as
/// `Condition:Name` = `true`/`false`.
fn resolve(value: &J, params: &HashMap<String, String>) -> String {
    let lookup = |key: &str| params.get(key).cloned().unwrap_or_else(|| panic!("{key} has no value in the test"));
    match value {
        J::String(s) => s.clone(),
        J::Number(n) => n.to_string(),
        J::Object(o) if o.contains_key("Ref") => lookup(o["Ref"].as_str().unwrap()),
        J::Object(o) if o.contains_key("Fn::GetAtt") => {
            let at = &o["Fn::GetAtt"];
            lookup(&format!("{}.{}", at[0].as_str().unwrap(), at[1].as_str().unwrap()))
        }
        J::Object(o) if o.contains_key("Fn::Sub") => sub(&o["Fn::Sub"], params),
        J::Object(o) if o.contains_key("Fn::If") => {
            let branches = &o["Fn::If"];
            let holds = lookup(&format!("Condition:{}", branches[0].as_str().unwrap())) == "true";
            resolve(&branches[if holds { 1 } else { 2 }], params)
        }
        other => panic!("cannot resolve {other}"),
    }
}

/// `Fn::Sub` of a string or of `[string, {name: value}]`.
fn sub(value: &J, params: &HashMap<String, String>) -> String {
    let (text, local) = match value {
        J::String(s) => (s.as_str(), None),
        J::Array(parts) => (parts[0].as_str().unwrap(), parts.get(1)),
        other => panic!("not a Fn::Sub: {other}"),
    };
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("${") {
        out.push_str(&rest[..at]);
        let end = rest[at..].find('}').expect("closed ${...}") + at;
        let name = &rest[at + 2..end];
        assert!(!name.starts_with('!'), "${{!...}} literals are not handled here");
        let value = match local.and_then(|l| l.get(name)) {
            Some(local) => resolve(local, params),
            None => resolve(&json!({ "Ref": name }), params),
        };
        out.push_str(&value);
        rest = &rest[end + 1..];
    }
    out + rest
}

/// A function's environment as SAM gives it: `Globals` merged with its own, resolved.
fn function_environment(t: &J, function: &str, params: &HashMap<String, String>) -> Vec<(String, String)> {
    let globals = t["Globals"]["Function"]["Environment"]["Variables"].as_object().cloned().unwrap_or_default();
    let own =
        t["Resources"][function]["Properties"]["Environment"]["Variables"].as_object().cloned().unwrap_or_default();
    globals.into_iter().chain(own).map(|(name, value)| (name, resolve(&value, params))).collect()
}

fn resources_of<'a>(t: &'a J, kind: &str) -> Vec<(&'a str, &'a J)> {
    t["Resources"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, r)| r["Type"] == kind)
        .map(|(n, r)| (n.as_str(), r))
        .collect()
}

/// The parameters of a stack as a test deploys it, what its resources resolve to, and its
/// conditions.
const GIVEN: &[(&str, &str)] = &[
    ("ImageUri", "123456789012.dkr.ecr.eu-west-1.amazonaws.com/baton:0123abc"),
    ("Sender", "Example Monthly <news@example.com>"),
    ("SenderIdentity", "example.com"),
    ("InboundFunctionUrl.FunctionUrl", "https://abcdefghij.lambda-url.eu-west-1.on.aws/"),
    ("UnsubscribeSecret", "arn:aws:secretsmanager:eu-west-1:123456789012:secret:UnsubscribeSecret-AbCdEf"),
    ("DatabaseSecret", "arn:aws:secretsmanager:eu-west-1:123456789012:secret:DatabaseSecret-GhIjKl"),
    ("DatabaseCluster.DBClusterArn", "arn:aws:rds:eu-west-1:123456789012:cluster:baton-newsletter-db"),
    ("ConfigurationSet", "baton-newsletter-set"),
    ("Condition:CreateDatabase", "true"),
    ("Condition:HasCustomUnsubscribeUrl", "false"),
];

/// The job file baked into the image with the chains' function's `BATON_CONFIG_OVERRIDES`.
fn deployed_config(t: &J, params: &HashMap<String, String>) -> Config {
    let env = &t["Resources"]["ChainFunction"]["Properties"]["Environment"]["Variables"];
    let overrides = sub(&env["BATON_CONFIG_OVERRIDES"]["Fn::Sub"], params);
    let path = repo("deploy/job/baton.toml");
    Config::parse_with_overrides(&read("deploy/job/baton.toml"), &path, Some(&overrides))
        .unwrap_or_else(|e| panic!("the deployed job file with the template's overrides: {e}"))
}

#[test]
fn the_template_keeps_the_settings_chains_depend_on() {
    let t = template("deploy/template.yaml");
    let params = parameters(&t, GIVEN);
    let number = |name: &str| params[name].parse::<u64>().unwrap_or_else(|_| panic!("{name} is not a number"));
    let chains = &t["Resources"]["ChainFunction"];
    assert_eq!(chains["Type"], "AWS::Serverless::Function");
    let p = &chains["Properties"];
    assert_eq!(p["PackageType"], "Image");
    // Lambda stops Lambda-to-Lambda loops after ~16 hops unless told otherwise.
    assert_eq!(p["RecursiveLoop"], "Allow", "a chain would die at its 16th hop");
    // Reserved concurrency from a parameter with room for a start and a sweep beside every chain.
    assert_eq!(p["ReservedConcurrentExecutions"], json!({"Ref": "ReservedConcurrency"}));
    assert!(number("ReservedConcurrency") >= number("Chains") + 2, "the default concurrency cannot hold the chains");
    assert!(t["Parameters"]["ReservedConcurrency"]["MinValue"].as_u64().unwrap() >= 2);
    // No async retries (a retried hop is a second copy), an age limit, failures kept in SQS.
    let invoke = &p["EventInvokeConfig"];
    assert_eq!(invoke["MaximumRetryAttempts"], 0);
    let on_failure = &invoke["DestinationConfig"]["OnFailure"];
    assert_eq!(on_failure["Type"], "SQS");
    let queue = on_failure["Destination"]["Fn::GetAtt"][0].as_str().expect("the destination is a queue of the stack");
    assert_eq!(t["Resources"][queue]["Type"], "AWS::SQS::Queue");
    assert_eq!(on_failure["Destination"]["Fn::GetAtt"][1], "Arn");

    // The timeout is the hop deadline: the same parameter sets both, and the job file alone
    // agrees with the parameter's default.
    assert_eq!(p["Timeout"], json!({"Ref": "HopTimeoutSeconds"}));
    let config = deployed_config(&t, &params);
    let hop_timeout = Duration::from_secs(number("HopTimeoutSeconds"));
    assert_eq!(config.settings.hop_timeout, hop_timeout, "function timeout != settings.hop_timeout");
    let mut shorter = params.clone();
    shorter.insert("HopTimeoutSeconds".into(), "120".into());
    assert_eq!(deployed_config(&t, &shorter).settings.hop_timeout, Duration::from_secs(120));
    let file = Config::load(&repo("deploy/job/baton.toml")).unwrap();
    assert_eq!(file.settings.hop_timeout, hop_timeout, "deploy/job/baton.toml disagrees with the template");
    assert_eq!(file.settings.sweep_interval, Duration::from_secs(60 * number("SweepMinutes")));
    // An event older than the stale threshold is redundant (the sweeper restarted its chain);
    // one younger than a hop's length may be a throttled hop worth running.
    let age = Duration::from_secs(invoke["MaximumEventAgeInSeconds"].as_u64().unwrap());
    assert!(age >= hop_timeout && age <= config.settings.stale_after(), "MaximumEventAgeInSeconds {age:?}");

    // The monthly schedule's job is in the image, with the template's chains, rate and sender.
    let job = config.job(&params["JobName"]).expect("JobName names a job of deploy/job/baton.toml");
    assert_eq!(u64::from(job.chains), number("Chains"));
    assert_eq!(job.time_zone, params["TimeZone"]);
    let newsletter = job.newsletter.as_ref().unwrap();
    assert_eq!(newsletter.send_rate, number("SendRate") as f64);
    assert_eq!(newsletter.from, params["Sender"]);
    assert_eq!(newsletter.unsubscribe_url, params["InboundFunctionUrl.FunctionUrl"]);
    assert_eq!(config.settings.sweep_interval, Duration::from_secs(60 * number("SweepMinutes")));

    // The inbound function: a public Function URL (RFC 8058), never the chains' function.
    let inbound = &t["Resources"]["InboundFunction"]["Properties"];
    assert_eq!(inbound["FunctionUrlConfig"]["AuthType"], "NONE");
    assert!(p.get("FunctionUrlConfig").is_none(), "the chains' function must not be reachable over HTTP");
    // SES events have a function of their own: a flood of requests to the public URL cannot
    // hold up bounces and complaints. Each loads the image's job file with its overrides, and
    // has time for an Aurora resume (45 s of retries).
    let ses_events = &t["Resources"]["SesEventsFunction"]["Properties"];
    assert_eq!(ses_events["EventInvokeConfig"]["DestinationConfig"]["OnFailure"]["Type"], "SQS");
    for f in [inbound, ses_events] {
        assert!(f["ReservedConcurrentExecutions"].as_u64().is_some(), "{f}: no concurrency of its own");
        assert!(f["Timeout"].as_u64().unwrap() >= 60, "{f}: no time for a database resume");
        let overrides = f["Environment"]["Variables"]["BATON_CONFIG_OVERRIDES"].as_str().unwrap();
        let config = Config::parse_with_overrides(
            &read("deploy/job/baton.toml"),
            &repo("deploy/job/baton.toml"),
            Some(overrides),
        )
        .expect("the function's config loads");
        assert_eq!(config.settings.hop_timeout.as_secs(), f["Timeout"].as_u64().unwrap());
    }

    // SES events of the stack's configuration set reach their function.
    let rule = &t["Resources"]["SesEventsRule"]["Properties"];
    assert_eq!(rule["EventPattern"]["source"], json!(["aws.ses"]));
    assert_eq!(rule["Targets"][0]["Arn"], json!({"Fn::GetAtt": ["SesEventsFunction", "Arn"]}));
    assert_eq!(
        t["Resources"]["ConfigurationSetEvents"]["Properties"]["EventDestination"]["MatchingEventTypes"],
        json!(["BOUNCE", "COMPLAINT", "DELIVERY"])
    );

    // Alarms on what says a chain is in trouble; StuckChains is what a sweep's metric line says.
    let alarmed: Vec<String> = resources_of(&t, "AWS::CloudWatch::Alarm")
        .into_iter()
        .map(|(_, a)| a["Properties"]["MetricName"].as_str().unwrap().to_owned())
        .collect();
    for (name, alarm) in resources_of(&t, "AWS::CloudWatch::Alarm") {
        assert!(alarm["Properties"]["AlarmActions"].is_array(), "{name} tells nobody");
    }
    for metric in ["Errors", "AsyncEventsDropped", "ApproximateNumberOfMessagesVisible", "StuckChains"] {
        assert!(alarmed.iter().any(|m| m == metric), "no alarm on {metric}");
    }
    // ... under the namespace the functions write to, without dimensions (as the line has none),
    // and each stack's own: stacks in one account never set off each other's alarm.
    let stuck = resources_of(&t, "AWS::CloudWatch::Alarm")
        .into_iter()
        .find(|(_, a)| a["Properties"]["MetricName"] == "StuckChains")
        .unwrap()
        .1;
    assert!(stuck["Properties"].get("Dimensions").is_none());
    let namespace = resolve(&stuck["Properties"]["Namespace"], &params);
    let environment = function_environment(&t, "ChainFunction", &params);
    let written = environment.iter().find(|(n, _)| n == "BATON_METRICS_NAMESPACE").map(|(_, v)| v.as_str());
    assert_eq!(written, Some(namespace.as_str()));
    assert!(namespace.ends_with(&format!("/{}", params["AWS::StackName"])), "{namespace}");
    let dashboard = &t["Resources"]["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"][1]["MetricsNamespace"];
    assert_eq!(resolve(dashboard, &params), namespace, "the dashboard charts another namespace");
    let line: J = serde_json::from_str(&baton::lambda::sweep_emf_line(&Default::default())).unwrap();
    assert!(
        line["_aws"]["CloudWatchMetrics"][0]["Metrics"].as_array().unwrap().iter().any(|m| m["Name"] == "StuckChains")
    );
}

/// Checks `name`'s `AllowedPattern` refuses every value of `refused` and allows every value of
/// `allowed`, and returns the function's config as each allowed value deploys it.
fn configs_for_allowed(t: &J, name: &str, allowed: &[&str], refused: &[&str]) -> Vec<(String, Config)> {
    let pattern = regex::Regex::new(t["Parameters"][name]["AllowedPattern"].as_str().unwrap()).unwrap();
    for value in refused {
        assert!(!pattern.is_match(value), "{name} allows {value:?}");
    }
    let mut configs = Vec::new();
    for value in allowed {
        assert!(pattern.is_match(value), "{name} refuses {value:?}");
        let mut params = parameters(t, GIVEN);
        params.insert(name.to_owned(), (*value).to_owned());
        let custom_url = !params["UnsubscribeBaseUrl"].is_empty();
        params.insert("Condition:HasCustomUnsubscribeUrl".into(), custom_url.to_string());
        configs.push(((*value).to_owned(), deployed_config(t, &params)));
    }
    configs
}

/// The parameters that go into the job's TOML: every value their patterns allow loads in the
/// function (a margin too large for the timeout, a number TOML refuses, would stop every cold
/// start of a stack that deployed cleanly), and the values TOML would refuse are not allowed.
#[test]
fn every_value_the_parameters_allow_loads_in_the_function() {
    let t = template("deploy/template.yaml");
    let cases: [(&str, &[&str], &[&str]); 4] = [
        ("Chains", &["1", "999", "1000"], &["0", "02", "1001", "1.5", ""]),
        ("HopTimeoutSeconds", &["120", "599", "900"], &["119", "901", "60", "0900"]),
        ("SweepMinutes", &["2", "9", "60"], &["1", "61", "05"]),
        ("SendRate", &["0", "0.5", "14", "999999.999"], &[".5", "014", "1e3", "-1", "1.2345"]),
    ];
    for (name, allowed, refused) in cases {
        assert_eq!(t["Parameters"][name]["Type"], "String", "{name}: a Number would pass 02 or .5 on to TOML");
        for (value, config) in configs_for_allowed(&t, name, allowed, refused) {
            if name == "HopTimeoutSeconds" {
                let hop_timeout = config.settings.hop_timeout.as_secs();
                assert_eq!(hop_timeout, value.parse::<u64>().unwrap());
                let age =
                    t["Resources"]["ChainFunction"]["Properties"]["EventInvokeConfig"]["MaximumEventAgeInSeconds"]
                        .as_u64()
                        .unwrap();
                assert!(age >= hop_timeout, "a throttled hop event expires before one hop's length");
            }
        }
    }
}

/// CloudFormation takes a template of at most 51,200 bytes inline; past that `aws cloudformation
/// deploy` needs an S3 bucket, which neither the workflow nor its role has.
#[test]
fn the_template_fits_an_inline_deploy() {
    let size = read("deploy/template.yaml").len();
    assert!(size < 51_200, "deploy/template.yaml is {size} bytes: past 51,200 the deploy needs --s3-bucket");
}

/// Sender and unsubscribe URL go into TOML strings: what their patterns allow must load.
#[test]
fn the_text_parameters_allow_only_what_the_function_can_load() {
    let t = template("deploy/template.yaml");
    let cases: [(&str, &[&str], &[&str]); 2] = [
        (
            "Sender",
            &["Example Monthly <news@example.com>", "news@example.com", "Zoë Ünal <zoe@example.com>"],
            &["a \" <x@example.com>", "a\\b <x@example.com>", "a\nb <x@example.com>", "a\u{1b}b <x@example.com>", ""],
        ),
        (
            "UnsubscribeBaseUrl",
            &["", "https://news.example.com/unsubscribe", "https://example.com/u?list=a%20b"],
            &["http://example.com/u", "https://a\\b", "https://a b", "https://a\"b", "https://a\n"],
        ),
    ];
    for (name, allowed, refused) in cases {
        for (value, config) in configs_for_allowed(&t, name, allowed, refused) {
            let newsletter = config.job("monthly-newsletter").unwrap().newsletter.clone().unwrap();
            if name == "Sender" {
                assert_eq!(newsletter.from, value);
            } else if !value.is_empty() {
                assert_eq!(newsletter.unsubscribe_url, value);
            }
        }
    }
}

#[test]
fn every_schedule_sends_an_event_the_binary_accepts() {
    let t = template("deploy/template.yaml");
    let params = parameters(&t, GIVEN);
    let schedules = resources_of(&t, "AWS::Scheduler::Schedule");
    assert_eq!(schedules.len(), 2, "a monthly start and a sweep");
    let mut kinds = Vec::new();
    for (name, schedule) in schedules {
        let target = &schedule["Properties"]["Target"];
        assert_eq!(target["Arn"], json!({"Fn::GetAtt": ["ChainFunction", "Arn"]}), "{name}");
        assert!(target["RetryPolicy"]["MaximumRetryAttempts"].as_u64().is_some(), "{name}: its own retry policy");
        assert!(target["DeadLetterConfig"]["Arn"]["Fn::GetAtt"][0].is_string(), "{name}: a dead-letter queue");
        let input = match &target["Input"] {
            J::String(s) => s.clone(),
            other => sub(&other["Fn::Sub"], &params),
        };
        // Scheduler fills in the time it fired for.
        let input = input.replace("<aws.scheduler.scheduled-time>", "2026-12-01T08:00:00Z");
        assert!(matches!(
            baton::inbound::Inbound::classify(&serde_json::from_str(&input).unwrap()),
            baton::inbound::Inbound::Baton
        ));
        let event = Event::parse(input.as_bytes()).unwrap_or_else(|e| panic!("{name}: {input}: {e}"));
        if let Event::Start { job, run_key, scheduled_time } = &event {
            assert_eq!(job, &params["JobName"]);
            assert_eq!(
                (run_key.as_deref(), scheduled_time.as_deref()),
                (None, Some("2026-12-01T08:00:00Z")),
                "{name}: the run key must come from the fire time"
            );
            assert_eq!(schedule["Properties"]["ScheduleExpressionTimezone"], json!({"Ref": "TimeZone"}));
        }
        kinds.push(format!("{:?}", std::mem::discriminant(&event)));
        if matches!(event, Event::Sweep {}) {
            let rate = sub(&schedule["Properties"]["ScheduleExpression"]["Fn::Sub"], &params);
            assert_eq!(rate, format!("rate({} minutes)", params["SweepMinutes"]));
        }
    }
    kinds.dedup();
    assert_eq!(kinds.len(), 2, "one start and one sweep");
}

/// Actions with no resource type, which IAM only grants on `*`.
const UNNAMEABLE: &[&str] = &["ses:GetAccount", "ecr:GetAuthorizationToken", "cloudformation:ValidateTemplate"];

#[test]
fn iam_names_every_resource_it_can() {
    for path in ["deploy/template.yaml", "deploy/github-oidc-role.yaml"] {
        let t = template(path);
        let mut statements = 0;
        for (role, r) in resources_of(&t, "AWS::IAM::Role") {
            // The role CloudFormation deploys with creates resources whose names it generates
            // (its checkov skips say so); the GitHub role can only hand it to CloudFormation.
            if role == "CloudFormationExecutionRole" {
                continue;
            }
            assert!(r["Properties"].get("ManagedPolicyArns").is_none(), "{path} {role}: managed policies grant on *");
            for policy in r["Properties"]["Policies"].as_array().unwrap() {
                for statement in policy["PolicyDocument"]["Statement"].as_array().unwrap() {
                    statements += 1;
                    let actions: Vec<&str> = match &statement["Action"] {
                        J::String(a) => vec![a.as_str()],
                        J::Array(a) => a.iter().map(|a| a.as_str().unwrap()).collect(),
                        other => panic!("{other}"),
                    };
                    assert!(actions.iter().all(|a| !a.contains('*')), "{path} {role}: wildcard action in {actions:?}");
                    let resources = match &statement["Resource"] {
                        J::Array(r) => r.clone(),
                        other => vec![other.clone()],
                    };
                    for resource in resources {
                        if resource == "*" {
                            assert!(
                                actions.iter().all(|a| UNNAMEABLE.contains(a)),
                                "{path} {role}: {actions:?} on * (name the resource)"
                            );
                        }
                    }
                }
            }
        }
        assert!(statements >= 4, "{path}: no statements read");
    }
    // The chains invoke only their own function, named without a reference to it (which would
    // be circular: the function depends on its role).
    let t = template("deploy/template.yaml");
    let statements = t["Resources"]["ChainRole"]["Properties"]["Policies"][0]["PolicyDocument"]["Statement"].clone();
    let invoke = statements.as_array().unwrap().iter().find(|s| s["Action"] == "lambda:InvokeFunction").unwrap();
    let arn = sub(&invoke["Resource"]["Fn::Sub"], &parameters(&t, GIVEN));
    assert_eq!(arn, "arn:aws:lambda:eu-west-1:123456789012:function:baton-newsletter-chains");
    assert_eq!(
        sub(&t["Resources"]["ChainFunction"]["Properties"]["FunctionName"]["Fn::Sub"], &parameters(&t, GIVEN)),
        "baton-newsletter-chains"
    );
    // GitHub may assume the deploy role only from this repository's branch.
    let oidc = template("deploy/github-oidc-role.yaml");
    let trust = &oidc["Resources"]["GitHubDeployRole"]["Properties"]["AssumeRolePolicyDocument"]["Statement"][0];
    let condition = &trust["Condition"]["StringEquals"];
    assert_eq!(condition["token.actions.githubusercontent.com:aud"], "sts.amazonaws.com");
    assert_eq!(
        condition["token.actions.githubusercontent.com:sub"],
        json!({"Fn::Sub": "repo:${Repository}:ref:refs/heads/${Branch}"})
    );
}

#[test]
fn the_template_carries_the_dashboard_of_dashboards() {
    let t = template("deploy/template.yaml");
    let body = &t["Resources"]["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"];
    let inline: J = serde_json::from_str(body[0].as_str().unwrap()).expect("the DashboardBody is JSON");
    let file: J = serde_json::from_str(&read("dashboards/cloudwatch/baton.json")).unwrap();
    assert!(
        inline == file,
        "deploy/template.yaml's DashboardBody differs from dashboards/cloudwatch/baton.json: run scripts/sync-dashboard"
    );
    for variable in ["FunctionName", "JobName", "OnFailureQueueName", "MetricsNamespace"] {
        assert!(body[1].get(variable).is_some(), "the dashboard's ${{{variable}}} is not given");
    }
}

#[test]
fn the_workflows_pin_their_actions_and_push_what_lambda_runs() {
    for entry in std::fs::read_dir(repo(".github/workflows")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for line in text.lines().filter(|l| l.trim_start().trim_start_matches("- ").starts_with("uses:")) {
            let target = line.split("uses:").nth(1).unwrap().split('#').next().unwrap().trim();
            if target.starts_with("./") {
                continue;
            }
            let (_, sha) = target.split_once('@').unwrap_or_else(|| panic!("{}: {line}", path.display()));
            assert!(
                sha.len() == 40 && sha.chars().all(|c| c.is_ascii_hexdigit()),
                "{}: `{target}` is not pinned by commit",
                path.display()
            );
        }
    }
    let deploy = read(".github/workflows/deploy.yml");
    for needed in [
        "provenance: false",
        "id-token: write",
        "role-to-assume: ${{ vars.AWS_DEPLOY_ROLE_ARN }}",
        "aws-actions/amazon-ecr-login@",
        "platforms: linux/arm64",
        ":${{ github.sha }}",
        "aws cloudformation deploy",
        "CAPABILITY_AUTO_EXPAND",
        "--template-file deploy/template.yaml",
        "needs: test",
    ] {
        assert!(deploy.contains(needed), "deploy.yml lacks `{needed}`");
    }
    assert!(read(".github/workflows/ci.yml").contains("run: .ci/run"), "pull requests run the README's suite");
}

#[test]
fn the_dockerfile_builds_with_the_tested_script_onto_provided_al2023() {
    let dockerfile = read("Dockerfile");
    for needed in [
        "ARG PLATFORM=linux/arm64",
        "public.ecr.aws/amazonlinux/amazonlinux:2023 AS toolchain",
        "cargo chef cook --release --locked",
        "RUN scripts/build-bootstrap /out/bootstrap",
        "FROM --platform=${PLATFORM} public.ecr.aws/lambda/provided:al2023",
        "COPY --from=build /out/bootstrap /var/runtime/bootstrap",
        "COPY deploy/job/ /var/task/",
        "COPY deploy/opt/ /opt/",
    ] {
        assert!(dockerfile.contains(needed), "the Dockerfile lacks `{needed}`");
    }
    let ignored = read(".dockerignore");
    for path in ["target/", "baton-data/", ".git/"] {
        assert!(ignored.lines().any(|l| l == path), ".dockerignore lets {path} into the build context");
    }
    // deploy/opt is copied to /opt as it is, and Lambda runs every file in /opt/extensions as an
    // extension: a stray one (a README) would fail every cold start.
    if let Ok(extensions) = std::fs::read_dir(repo("deploy/opt/extensions")) {
        use std::os::unix::fs::PermissionsExt;
        for entry in extensions {
            let entry = entry.unwrap();
            let mode = entry.metadata().unwrap().permissions().mode();
            assert!(mode & 0o111 != 0, "deploy/opt/extensions/{:?} is not executable", entry.file_name());
        }
    }
    assert!(repo("deploy/opt/.keep").exists());
}

/// The highest `GLIBC_x.y` symbol version `binary` needs, by `readelf`.
fn newest_glibc_needed(binary: &Path) -> Option<(u32, u32)> {
    let out = std::process::Command::new("readelf").args(["--version-info", "--wide"]).arg(binary).output();
    let out = out.expect("readelf (binutils) runs");
    assert!(out.status.success(), "readelf: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("GLIBC_"))
        .filter_map(|v| {
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        })
        .max()
}

/// Lambda's `provided:al2023` runtime: Amazon Linux 2023's glibc.
const AL2023_GLIBC: (u32, u32) = (2, 34);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_release_bootstrap_runs_on_al2023_and_serves_the_scheduled_start() {
    // Built as the Dockerfile builds it.
    let bootstrap = Path::new(env!("CARGO_TARGET_TMPDIR")).join("lambda/bootstrap");
    // Without the variables `cargo test` sets for a test: ring's build script depends on
    // CARGO_MANIFEST_DIR, so with them the build scripts/test made beforehand would be redone.
    let mut build = std::process::Command::new(repo("scripts/build-bootstrap"));
    for (name, _) in std::env::vars() {
        if name.starts_with("CARGO_") && !matches!(name.as_str(), "CARGO_HOME" | "CARGO_TARGET_DIR") {
            build.env_remove(name);
        }
    }
    let built = build.arg(&bootstrap).output().expect("scripts/build-bootstrap runs");
    assert!(built.status.success(), "scripts/build-bootstrap: {}", String::from_utf8_lossy(&built.stderr));
    let glibc = newest_glibc_needed(&bootstrap).expect("a glibc binary names its symbol versions");
    assert!(
        glibc <= AL2023_GLIBC,
        "the bootstrap needs GLIBC_{}.{}, Lambda's provided:al2023 has 2.34",
        glibc.0,
        glibc.1
    );

    // The deployed job, against its own source table shape.
    let dir = tempfile::tempdir().unwrap();
    let store = fresh_store(Backend::Postgres, dir.path()).await;
    store
        .query(Stmt::new(
            "CREATE TABLE subscribers (id BIGINT PRIMARY KEY, email TEXT, first_name TEXT, confirmed BOOLEAN NOT NULL)",
            Params::new(),
        ))
        .await
        .unwrap();
    store
        .query(Stmt::new(
            "INSERT INTO subscribers SELECT i, 'reader' || i || '@example.com', 'Zoë ' || i, i % 7 <> 0 \
             FROM generate_series(1, 1200) AS i",
            Params::new(),
        ))
        .await
        .unwrap();
    let name = store.query(Stmt::new("SELECT current_database() AS d", Params::new())).await.unwrap();
    let name = name.first().unwrap().text("d").unwrap().unwrap();
    let admin = std::env::var("BATON_TEST_PG_URL").unwrap();
    let database_url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);

    // The chains' function's environment as the template sets it (the Data API swapped for a
    // direct connection to the test server), the unsubscribe key from Secrets Manager.
    let t = template("deploy/template.yaml");
    let mut params = parameters(&t, GIVEN);
    // 14 a second (the default, SES's starter quota) would take a minute and more.
    params.insert("SendRate".into(), "300".into());
    let mut environment = function_environment(&t, "ChainFunction", &params);
    // As deployed, the function reaches the stack's cluster and secret through the Data API
    // (what Lambda mode reads from its environment, with AWS_LAMBDA_FUNCTION_NAME from Lambda).
    let deployed = environment.clone();
    let var = |name: &str| match name {
        "AWS_LAMBDA_FUNCTION_NAME" => Some("baton-newsletter-chains".to_owned()),
        _ => deployed.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone()).filter(|v| !v.is_empty()),
    };
    let settings = baton::compose::AdapterSettings::from_vars(var).expect("the deployed environment composes");
    let baton::compose::StoreSettings::DataApi(target) = &settings.store else { panic!("{:?}", settings.store) };
    assert_eq!(
        (target.resource_arn.as_str(), target.secret_arn.as_str(), target.database.as_str()),
        (
            params["DatabaseCluster.DBClusterArn"].as_str(),
            params["DatabaseSecret"].as_str(),
            params["DatabaseName"].as_str()
        )
    );
    let names: Vec<&str> = environment.iter().map(|(n, _)| n.as_str()).collect();
    for needed in ["BATON_CONFIG_OVERRIDES", "BATON_UNSUBSCRIBE_SECRET_ARN", "BATON_SES_CONFIGURATION_SET"] {
        assert!(names.contains(&needed), "the chains' function has no {needed}: {names:?}");
    }
    // As the image sets it; and the Data API swapped for a direct connection to the test server
    // (an explicit BATON_STORE, as the cluster's ARN is still there).
    environment.push(("BATON_CONFIG".into(), repo("deploy/job/baton.toml").display().to_string()));
    environment.retain(|(name, _)| name != "BATON_STORE");
    environment.push(("BATON_STORE".into(), "postgres".into()));
    environment.push(("BATON_DATABASE_URL".into(), database_url));
    let environment: Vec<(&str, String)> = environment.iter().map(|(n, v)| (n.as_str(), v.clone())).collect();
    let ses = Arc::new(FakeSes { max_send_rate: 2000.0, ..Default::default() });
    let (em, addr) = emulator::serve(ses.clone()).await;
    let mut lambda = emulator::launch(&bootstrap, addr, &environment);

    // The monthly schedule's input, as Scheduler sends it.
    let start = &t["Resources"]["MonthlyStart"]["Properties"]["Target"]["Input"]["Fn::Sub"];
    let start = sub(start, &params).replace("<aws.scheduler.scheduled-time>", "2026-12-01T08:00:00Z");
    let (ok, body) = lambda.answer(&em, &em.enqueue(start.as_bytes())).await;
    assert!(ok, "{body}\n{}", lambda.stderr.lock().unwrap().join("\n"));
    let started: J = serde_json::from_str(&body).unwrap();
    let confirmed = (1..=1200).filter(|i| i % 7 != 0).count();
    assert_eq!(
        (started["outcome"].as_str(), started["items"].as_u64()),
        (Some("started"), Some(confirmed as u64)),
        "{body}"
    );
    let until = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let rows = store.query(Stmt::new("SELECT status, run_key FROM baton_runs", Params::new())).await.unwrap();
        let row = rows.first().unwrap();
        if row.text("status").unwrap().as_deref() == Some("succeeded") {
            assert_eq!(row.text("run_key").unwrap().as_deref(), Some("2026-12"), "the fire time's month");
            break;
        }
        if tokio::time::Instant::now() > until {
            let chains = store.query(Stmt::new("SELECT * FROM baton_chains", Params::new())).await.unwrap();
            panic!("the run did not finish: {:?}", chains.rows);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The template's parameters reached the run (its snapshot).
    let snapshot = store.query(Stmt::new("SELECT job_config FROM baton_runs", Params::new())).await.unwrap();
    let snapshot = snapshot.first().unwrap().text("job_config").unwrap().unwrap();
    assert!(snapshot.contains("\"send_rate\":300.0") && snapshot.contains("\"chains\":2"), "{snapshot}");
    let sent = ses.sent.lock().unwrap().clone();
    let unique: std::collections::HashSet<_> = sent.iter().collect();
    assert_eq!((sent.len(), unique.len()), (confirmed, confirmed), "every confirmed subscriber once, nobody else");
    assert!(!sent.contains(&"reader7@example.com".to_owned()), "an unconfirmed subscriber was mailed");
    // Its metric lines go to the stack's namespace (the one its StuckChains alarm watches).
    let namespace = var("BATON_METRICS_NAMESPACE").expect("a metrics namespace");
    let lines = lambda.stdout.lock().unwrap().clone();
    let emf: Vec<J> =
        lines.iter().filter_map(|l| serde_json::from_str::<J>(l).ok()).filter(|v| v.get("_aws").is_some()).collect();
    let elsewhere = emf.iter().filter(|v| v["_aws"]["CloudWatchMetrics"][0]["Namespace"] != namespace.as_str());
    assert!(!emf.is_empty() && elsewhere.count() == 0, "not all under {namespace}: {emf:?}");
    // Read once, at the sandbox's start, from the secret the template names.
    assert_eq!(*em.secrets_read.lock().unwrap(), vec![params["UnsubscribeSecret"].clone()]);
    // Links point at the stack's unsubscribe endpoint and are signed with the stored key.
    let raw = ses.raw.lock().unwrap().first().cloned().unwrap();
    let link = raw.lines().find(|l| l.starts_with("List-Unsubscribe: <")).expect("a List-Unsubscribe header");
    assert!(link.contains(&format!("<{}?", params["InboundFunctionUrl.FunctionUrl"])), "{link}");
    let address = sent.first().unwrap();
    let signed = crate::suppression::link_query(address, emulator::SECRET_STRING, &params["JobName"]);
    assert!(link.contains(&signed), "{link} is not signed with the Secrets Manager key ({signed})");
}
