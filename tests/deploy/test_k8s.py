"""deploy/k8s: every manifest parses and hangs together with the others, the scripts and the image.

No cluster here, so the checks are structural: identities, kustomize generators that match what
deploy/certs.sh makes, references (Secrets, ConfigMaps, volumes) that resolve, selectors and ports that
agree, container commands that the deploy scripts and `privtune serve` actually accept.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import yaml

from tests.deploy.conftest import DEPLOY, REPO, make_certs, script_options

K8S = DEPLOY / "k8s"
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
WORKDIR = re.search(r"^WORKDIR\s+(\S+)", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)


def manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


DOCS = manifests()


def of_kind(kind: str) -> list[dict]:
    return [doc for _, doc in DOCS if doc["kind"] == kind]


def generated(kind: str) -> dict[str, dict[str, str]]:
    """Generator name -> {key in the object: source file relative to deploy/k8s}."""
    section = {"Secret": "secretGenerator", "ConfigMap": "configMapGenerator"}[kind]
    out = {}
    for gen in KUSTOMIZATION.get(section, []):
        keys = {}
        for item in gen["files"]:
            key, _, source = item.rpartition("=")
            keys[key or Path(source).name] = source
        out[gen["name"]] = keys
    return out


def pod_specs() -> list[tuple[str, dict]]:
    """(owner name, pod spec) of every Deployment and every RayCluster group."""
    specs = [(d["metadata"]["name"], d["spec"]["template"]["spec"]) for d in of_kind("Deployment")]
    for cluster in of_kind("RayCluster"):
        specs.append((cluster["metadata"]["name"] + "/head", cluster["spec"]["headGroupSpec"]["template"]["spec"]))
        specs += [
            (f"{cluster['metadata']['name']}/{g['groupName']}", g["template"]["spec"])
            for g in cluster["spec"]["workerGroupSpecs"]
        ]
    return specs


def containers() -> list[tuple[str, dict, dict]]:
    return [(owner, spec, c) for owner, spec in pod_specs() for c in spec["containers"]]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def runs_script(container: dict, script: str) -> bool:
    return bool(container.get("command")) and container["command"][0] == f"{WORKDIR}/deploy/{script}"


def container_named(name: str) -> dict:
    return next(c for owner, _, c in containers() if owner == name)


# ------------------------------------------------------------------------------------------- identity


def test_every_document_has_an_identity_and_names_are_unique():
    assert DOCS, "no manifests found"
    seen = set()
    for file, doc in DOCS:
        assert isinstance(doc.get("apiVersion"), str) and isinstance(doc.get("kind"), str), file
        name = doc.get("metadata", {}).get("name")
        assert isinstance(name, str) and DNS_1123.match(name), (file, name)
        assert (doc["kind"], name) not in seen, f"duplicate {doc['kind']} {name}"
        seen.add((doc["kind"], name))
        assert "namespace" not in doc["metadata"], f"{file}: the kustomization sets the namespace"


def test_kustomization_lists_every_manifest_and_sets_the_namespace():
    assert sorted(KUSTOMIZATION["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    namespaces = [d["metadata"]["name"] for d in of_kind("Namespace")]
    assert namespaces == [KUSTOMIZATION["namespace"]]


def test_generators_read_exactly_what_certs_sh_makes(tmp_path):
    owners = sum(runs_script(c, "supernode.sh") for _, _, c in containers())
    made = make_certs(tmp_path / "certs", owners)
    assert made.returncode == 0, made.stderr
    for kind in ("Secret", "ConfigMap"):
        for name, keys in generated(kind).items():
            for source in keys.values():
                assert source.startswith("certs/"), (name, source)
                assert (tmp_path / source).is_file(), f"{name}: certs.sh makes no {source}"
    # Public keys only in the ConfigMap; private keys only in Secrets.
    for source in generated("ConfigMap")["privtune-node-public-keys"].values():
        assert source.endswith(".pub")


# ----------------------------------------------------------------------------------------- references


def test_every_referenced_secret_configmap_and_claim_exists():
    defined = {
        "Secret": set(generated("Secret")) | {d["metadata"]["name"] for d in of_kind("Secret")},
        "ConfigMap": set(generated("ConfigMap")) | {d["metadata"]["name"] for d in of_kind("ConfigMap")},
        "PersistentVolumeClaim": {d["metadata"]["name"] for d in of_kind("PersistentVolumeClaim")},
    }
    used = {kind: set() for kind in defined}
    for owner, spec in pod_specs():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            if "secret" in volume:
                used["Secret"].add(volume["secret"]["secretName"])
            if "configMap" in volume:
                used["ConfigMap"].add(volume["configMap"]["name"])
            if "persistentVolumeClaim" in volume:
                used["PersistentVolumeClaim"].add(volume["persistentVolumeClaim"]["claimName"])
        for container in spec["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{owner}: mount {mount['name']} has no volume"
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                for key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                    if key in ref:
                        used[kind].add(ref[key]["name"])
    for kind, names in used.items():
        assert names <= defined[kind], f"{kind} used but not defined: {names - defined[kind]}"
        assert defined[kind] <= names, f"{kind} defined but never used: {defined[kind] - names}"


def mounted_keys(spec: dict, container: dict, path: str) -> set[str] | None:
    """Keys of the Secret/ConfigMap mounted at ``path`` in this container (None: not such a mount)."""
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        if mount["mountPath"] == path:
            volume = volumes[mount["name"]]
            if "secret" in volume:
                return set(generated("Secret")[volume["secret"]["secretName"]])
            if "configMap" in volume:
                return set(generated("ConfigMap")[volume["configMap"]["name"]])
    return None


def test_files_the_scripts_read_are_in_the_mounted_secrets():
    for owner, spec, container in containers():
        args = container.get("args", [])
        if runs_script(container, "superlink.sh"):
            assert {"ca.crt", "server.pem", "server.key"} <= mounted_keys(spec, container, flag(args, "--certs"))
            assert all(k.endswith(".pub") for k in mounted_keys(spec, container, flag(args, "--keys")))
        if runs_script(container, "supernode.sh"):
            for option in ("--key", "--ca"):
                path = Path(flag(args, option))
                assert path.name in mounted_keys(spec, container, str(path.parent)), (owner, option)
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            assert mounts[flag(args, "--data")].get("readOnly") is True, f"{owner}: the data volume should be read-only"
            assert flag(args, "--workspace") in mounts, owner


# ------------------------------------------------------------------------------------ selectors/ports


def test_deployments_select_their_own_pods_and_services_select_one_deployment():
    deployments = of_kind("Deployment")
    for d in deployments:
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), d["metadata"]["name"]
    for service in of_kind("Service"):
        selector = service["spec"]["selector"]
        matches = [d for d in deployments if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, f"Service {service['metadata']['name']} selects {len(matches)} Deployments"
        ports = {
            p["name"]: p["containerPort"]
            for c in matches[0]["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            assert target in ports or target in ports.values(), (service["metadata"]["name"], target)
            assert ports.get(target, target) == port["port"], "Service and container ports differ"


def test_ports_and_addresses_agree_across_roles():
    services = {s["metadata"]["name"]: s for s in of_kind("Service")}
    superlink = container_named("privtune-superlink")
    link_port = int(flag(superlink["args"], "--port"))
    assert flag(superlink["args"], "--host") == "0.0.0.0"
    assert [p["containerPort"] for p in superlink["ports"]] == [link_port]
    assert [p["port"] for p in services["privtune-superlink"]["spec"]["ports"]] == [link_port]
    for owner, _, container in containers():
        if runs_script(container, "supernode.sh"):
            host, _, port = flag(container["args"], "--superlink").rpartition(":")
            assert host in services and int(port) == link_port, owner

    cluster = of_kind("RayCluster")[0]
    head_ports = {
        p["name"]: p["containerPort"]
        for p in cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    }
    serve = container_named("privtune-serve")
    # KubeRay names the head's Service <cluster>-head-svc; the Ray client listens on the `client` port.
    assert flag(serve["args"], "--address") == f"ray://{cluster['metadata']['name']}-head-svc:{head_ports['client']}"
    assert [p["containerPort"] for p in serve["ports"]] == [int(flag(serve["args"], "--port"))]


def test_the_superlink_certificate_covers_the_name_supernodes_dial():
    instructions = [line for line in (K8S / "kustomization.yaml").read_text().splitlines() if "certs.sh" in line]
    hosts = {h for line in instructions for h in re.findall(r"--host\s+(\S+)", line)}
    dialled = {
        flag(c["args"], "--superlink").rpartition(":")[0] for _, _, c in containers() if runs_script(c, "supernode.sh")
    }
    assert dialled and dialled <= hosts


# --------------------------------------------------------------------------------- commands and image


def test_script_commands_are_the_deploy_scripts_with_options_they_accept():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    checked = 0
    for owner, _, container in containers():
        command = container.get("command", [])
        if not command or not command[0].startswith(f"{WORKDIR}/deploy/"):
            continue
        script = REPO / Path(command[0]).relative_to(WORKDIR)
        assert script.is_file(), f"{owner}: {command[0]} is not a deploy script"
        assert f"deploy/{script.name}" in dockerfile, f"the image does not copy deploy/{script.name}"
        options = script_options(script)
        args = container["args"]
        i = 0
        while i < len(args):
            assert args[i] in options, f"{owner}: {script.name} has no option {args[i]}"
            i += 2 if options[args[i]] else 1
        checked += 1
    assert checked == 3  # the SuperLink and two SuperNodes


def test_serve_command_parses_with_privtune_serve_options():
    from privtune.cli import COMMANDS

    serve = container_named("privtune-serve")
    assert serve["command"] == ["privtune", "serve"]
    module = next(c.module for c in COMMANDS if c.name == "serve")
    parser = argparse.ArgumentParser(exit_on_error=False)
    __import__(module, fromlist=["configure"]).configure(parser)
    parsed = parser.parse_args(serve["args"])
    assert parsed.address.startswith("ray://") and parsed.host == "0.0.0.0"
    # Off loopback it must serve TLS, from files in a mounted secret, with a certificate for its Service name.
    assert not parsed.insecure and parsed.tls_cert and parsed.tls_key
    spec = next(spec for owner, spec, _ in containers() if owner == "privtune-serve")
    for path in (Path(parsed.tls_cert), Path(parsed.tls_key)):
        assert path.name in (mounted_keys(spec, serve, str(path.parent)) or set()), path
    instructions = [line for line in (K8S / "kustomization.yaml").read_text().splitlines() if "certs.sh" in line]
    assert any(re.search(r"--host\s+privtune-serve\b", line) for line in instructions)
    assert [d for _, d in DOCS if d["kind"] == "Service" and d["metadata"]["name"] == "privtune-serve"]


def test_one_image_everywhere_with_the_pinned_ray():
    import ray

    images = {c["image"] for _, _, c in containers()}
    assert len(images) == 1, images
    pins = dict(
        re.match(r"([\w\[\]-]+)==(\S+)", dep).groups()
        for dep in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
        if "==" in dep
    )
    assert of_kind("RayCluster")[0]["spec"]["rayVersion"] == pins["ray"] == ray.__version__
    tag = next(iter(images))
    assert (
        f"-t {tag} " in (DEPLOY / "Dockerfile").read_text() and f"-t {tag} " in (K8S / "kustomization.yaml").read_text()
    )
