// Schema and policy check of rendered kvserve manifests, run by deploy/lint.sh:
//   kubectl kustomize deploy/k8s/overlays/cuda | node validate.mjs cuda --gpu
// Validates the core kinds with kubernetes-models (kinds it lacks, such as the
// ServiceMonitor CRD, are skipped and counted), then asserts what the
// deployment relies on: gRPC probes on an integer port, a grace period longer
// than --drain-timeout and shorter than liveness takes to fail (health is
// NOT_SERVING while draining), the security context and, with --gpu, the GPU
// request, toleration and /dev/shm. Prints a summary line (problems first,
// indented); exits 1 on any problem.
import { readFileSync } from 'node:fs';
import yaml from 'js-yaml';

const [name = 'stdin', ...flags] = process.argv.slice(2);
const gpu = flags.includes('--gpu');
const docs = yaml.loadAll(readFileSync(0, 'utf8')).filter(Boolean);
const errors = [];
const fail = (msg) => errors.push(msg);
let validated = 0;
const skipped = new Set();

for (const doc of docs) {
  const where = `${doc.kind}/${doc.metadata?.name}`;
  let Model;
  try {
    ({ [doc.kind]: Model } = await import(`kubernetes-models/${doc.apiVersion}/${doc.kind}`));
  } catch {
    Model = undefined;
  }
  if (!Model) {
    skipped.add(doc.kind);
    continue;
  }
  try {
    new Model(doc).validate();
    validated++;
  } catch (e) {
    fail(`${where}: ${e.message}`);
  }
}

const byKind = (kind) => docs.filter((d) => d.kind === kind);
const deployments = byKind('Deployment');
if (deployments.length !== 1) fail(`expected 1 Deployment, found ${deployments.length}`);
for (const dep of deployments) checkDeployment(dep);

const services = byKind('Service');
const clusterIP = services.find((s) => s.spec.clusterIP !== 'None');
const headless = services.find((s) => s.spec.clusterIP === 'None');
if (!clusterIP) fail('no ClusterIP Service');
else {
  for (const [port, pname] of [[50051, 'grpc'], [9400, 'metrics']]) {
    if (!clusterIP.spec.ports?.some((p) => p.port === port && p.name === pname))
      fail(`Service ${clusterIP.metadata.name}: no port ${pname}=${port}`);
  }
}
if (!headless) fail('no headless Service (clusterIP: None)');
if (byKind('PodDisruptionBudget').length !== 1) fail('expected 1 PodDisruptionBudget');
if (byKind('ServiceMonitor').length !== 1) fail('expected 1 ServiceMonitor');

function argValue(args, flag) {
  const i = args.indexOf(flag);
  if (i >= 0) return args[i + 1];
  const eq = args.find((a) => a.startsWith(`${flag}=`));
  return eq?.slice(flag.length + 1);
}

function checkDeployment(dep) {
  const where = `Deployment/${dep.metadata.name}`;
  const pod = dep.spec.template;
  const spec = pod.spec;
  const c = spec.containers.find((x) => x.name === 'kvserve') ?? spec.containers[0];
  const args = (c.args ?? []).map(String);
  const grpcPort = c.ports?.find((p) => p.name === 'grpc')?.containerPort;

  for (const probe of ['startupProbe', 'livenessProbe', 'readinessProbe']) {
    const g = c[probe]?.grpc;
    if (!g) fail(`${where}: ${probe} is not a grpc probe`);
    else if (!Number.isInteger(g.port)) fail(`${where}: ${probe}.grpc.port must be an integer`);
    else if (g.port !== grpcPort) fail(`${where}: ${probe}.grpc.port ${g.port} is not the grpc port`);
  }
  if (c.readinessProbe?.grpc?.service !== 'kvserve.v1.Generation')
    fail(`${where}: readinessProbe.grpc.service must be kvserve.v1.Generation`);

  const drain = Number(argValue(args, '--drain-timeout'));
  const grace = spec.terminationGracePeriodSeconds;
  if (!Number.isFinite(drain)) fail(`${where}: no --drain-timeout in args`);
  else if (!(grace > drain))
    fail(`${where}: terminationGracePeriodSeconds (${grace}) must exceed --drain-timeout (${drain})`);
  const live = c.livenessProbe ?? {};
  if ((live.periodSeconds ?? 10) * (live.failureThreshold ?? 3) < grace)
    fail(`${where}: livenessProbe would fail within the grace period while draining`);
  if (!c.lifecycle?.preStop) fail(`${where}: no preStop hook`);
  if (argValue(args, '--host') !== '0.0.0.0') fail(`${where}: --host must be 0.0.0.0 for probes`);

  const psc = spec.securityContext ?? {};
  const csc = c.securityContext ?? {};
  if (!(csc.runAsNonRoot ?? psc.runAsNonRoot)) fail(`${where}: runAsNonRoot not set`);
  if ((csc.runAsUser ?? psc.runAsUser) !== 10001) fail(`${where}: runAsUser must be 10001`);
  if (csc.readOnlyRootFilesystem !== true) fail(`${where}: readOnlyRootFilesystem not set`);
  if (csc.allowPrivilegeEscalation !== false) fail(`${where}: allowPrivilegeEscalation not false`);
  if (!csc.capabilities?.drop?.includes('ALL')) fail(`${where}: capabilities do not drop ALL`);
  if ((csc.seccompProfile ?? psc.seccompProfile)?.type !== 'RuntimeDefault')
    fail(`${where}: seccompProfile is not RuntimeDefault`);
  for (const k of ['requests', 'limits']) {
    for (const r of ['cpu', 'memory']) {
      if (c.resources?.[k]?.[r] === undefined) fail(`${where}: no resources.${k}.${r}`);
    }
  }
  if (pod.metadata?.annotations?.['prometheus.io/scrape'] !== 'true')
    fail(`${where}: no prometheus.io/scrape annotation`);

  const device = argValue(args, '--device');
  const gpuReq = c.resources?.requests?.['nvidia.com/gpu'];
  const gpuLim = c.resources?.limits?.['nvidia.com/gpu'];
  if (!gpu) {
    if (device !== 'cpu') fail(`${where}: --device must be cpu, got ${device}`);
    if (gpuReq !== undefined || gpuLim !== undefined) fail(`${where}: GPU requested without --gpu`);
    return;
  }
  if (device !== 'cuda') fail(`${where}: --device must be cuda, got ${device}`);
  if (!(Number(gpuReq) >= 1) || Number(gpuReq) !== Number(gpuLim))
    fail(`${where}: nvidia.com/gpu must be set, equal, in requests (${gpuReq}) and limits (${gpuLim})`);
  if (!spec.tolerations?.some((t) => t.key === 'nvidia.com/gpu'))
    fail(`${where}: no toleration for nvidia.com/gpu`);
  const shm = c.volumeMounts?.find((m) => m.mountPath === '/dev/shm');
  const vol = shm && spec.volumes?.find((v) => v.name === shm.name);
  if (!vol) fail(`${where}: no /dev/shm volume mount`);
  else if (vol.emptyDir?.medium !== 'Memory' || !vol.emptyDir?.sizeLimit)
    fail(`${where}: /dev/shm must be an emptyDir with medium Memory and a sizeLimit`);
}

for (const e of errors) console.log(`  ${name}: ${e}`);
const note = skipped.size ? `, skipped unknown kinds: ${[...skipped].join(' ')}` : '';
console.log(`${name}: ${docs.length} objects, ${validated} schema-validated${note}, ${errors.length} problems`);
process.exit(errors.length ? 1 : 0);
