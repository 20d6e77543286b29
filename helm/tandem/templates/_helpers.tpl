{{/* Chart name, truncated for DNS labels. */}}
{{- define "tandem.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; every object name starts with it. */}}
{{- define "tandem.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else if contains (include "tandem.name" .) .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "tandem.name" .) | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "tandem.labels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "tandem.metaLabels" . }}
{{- end }}

{{/* Labels on every object besides the selector labels. */}}
{{- define "tandem.metaLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: tandem
{{- end }}

{{/* Selector labels of one role: dict "root" . "component" "cpu-sampler" ["stage" i]. */}}
{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- if hasKey . "stage" }}
tandem.dev/stage: {{ .stage | quote }}
{{- end }}
{{- end }}

{{/* Object names of each role. */}}
{{- define "tandem.coordinator.name" -}}{{ include "tandem.fullname" . }}-coordinator{{- end }}
{{- define "tandem.cpuSampler.name" -}}{{ include "tandem.fullname" . }}-cpu-sampler{{- end }}
{{- define "tandem.kvStore.name" -}}{{ include "tandem.fullname" . }}-kv-store{{- end }}
{{- define "tandem.gateway.name" -}}{{ include "tandem.fullname" . }}-gateway{{- end }}
{{- define "tandem.stage.name" -}}{{ include "tandem.fullname" .root }}-stage-{{ .stage }}{{- end }}

{{/* Cluster DNS suffix of a Service in this namespace. */}}
{{- define "tandem.svcSuffix" -}}{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}{{- end }}

{{/* host:port of stage i (its headless Service). */}}
{{- define "tandem.stage.address" -}}
{{ include "tandem.stage.name" . }}.{{ include "tandem.svcSuffix" .root }}:{{ .root.Values.port }}
{{- end }}

{{/* host:port of the KV store, or "" when it is disabled. */}}
{{- define "tandem.kvStore.address" -}}
{{- if .Values.kvStore.enabled -}}
{{ include "tandem.kvStore.name" . }}.{{ include "tandem.svcSuffix" . }}:{{ .Values.port }}
{{- end -}}
{{- end }}

{{/* Sampler workload kind: a StatefulSet gives static discovery one stable DNS name per replica. */}}
{{- define "tandem.cpuSampler.kind" -}}
{{- if eq .Values.cpuSampler.discovery "static" }}StatefulSet{{ else }}Deployment{{ end }}
{{- end }}

{{/* Sampler addresses (YAML list) for the coordinator config with static discovery: one stable
StatefulSet DNS name per replica. */}}
{{- define "tandem.cpuSampler.addresses" -}}
{{- $name := include "tandem.cpuSampler.name" . }}
{{- $suffix := include "tandem.svcSuffix" . }}
{{- range $i := until (int .Values.cpuSampler.replicas) }}
- {{ printf "%s-%d.%s.%s:%d" $name $i $name $suffix (int $.Values.port) }}
{{- end }}
{{- end }}

{{/* The technique switches, spelled as services/tandem/presets.py spells them (Techniques). */}}
{{- define "tandem.switches" -}}
cpu_sampling fast_sampler token_safe_prep structured_streams shared_memory_logits temporal_phases greedy_on_stage decode_chaining
{{- end }}

{{/* The resolved switches as a JSON object: techniques.preset's value of each (full: on, baseline:
off) unless techniques.SWITCH sets it; presets.resolve("full-SWITCH") is preset full with SWITCH false. */}}
{{- define "tandem.techniques" -}}
{{- $preset := eq .Values.techniques.preset "full" }}
{{- $resolved := dict }}
{{- range $switch := splitList " " (include "tandem.switches" .) }}
{{- $set := index $.Values.techniques $switch }}
{{- $_ := set $resolved $switch (ternary $preset $set (kindIs "invalid" $set)) }}
{{- end }}
{{- toJson $resolved }}
{{- end }}

{{/* The config fields the switches set, as Techniques.sampler_options(), stage_options(is_last) and
coordinator_options() give them (tests/test_helm.py compares every preset with presets.py). */}}
{{- define "tandem.samplerOptions" -}}
{{- $t := include "tandem.techniques" . | fromJson }}
{{- toJson (dict "fast_sampler" $t.fast_sampler) }}
{{- end }}

{{/* dict "root" $ "isLast" bool: without CPU sampling the last stage samples, with greedy_on_stage the argmax rows. */}}
{{- define "tandem.stageOptions" -}}
{{- $t := include "tandem.techniques" .root | fromJson }}
{{- toJson (dict "sample_on_stage" (and .isLast (or (not $t.cpu_sampling) $t.greedy_on_stage)) "fast_sampler" $t.fast_sampler "overlap_input_prep" $t.token_safe_prep "structured_streams" $t.structured_streams "shared_memory_logits" $t.shared_memory_logits) }}
{{- end }}

{{/* Samplers get row plans only with structured streams; the stage samples argmax rows only beside a pool. */}}
{{- define "tandem.coordinatorOptions" -}}
{{- $t := include "tandem.techniques" . | fromJson }}
{{- toJson (dict "sample_plans" (and $t.cpu_sampling $t.structured_streams) "temporal_phases" $t.temporal_phases "greedy_on_stage" (and $t.cpu_sampling $t.greedy_on_stage) "decode_chaining" $t.decode_chaining) }}
{{- end }}

{{/* "true" when the sampler pool is deployed (techniques.cpu_sampling), else "": without it the last
stage samples in-process and the coordinator names that stage as its one sampler, as `tandem up` does. */}}
{{- define "tandem.cpuSampling" -}}
{{- if (include "tandem.techniques" . | fromJson).cpu_sampling }}true{{ end }}
{{- end }}

{{/* "true" when the coordinator and the last stage follow the sampler pool's EndpointSlices (and so
read the Kubernetes API), else "". */}}
{{- define "tandem.readsEndpointSlices" -}}
{{- if and (include "tandem.cpuSampling" .) (eq .Values.cpuSampler.discovery "endpointslices") }}true{{ end }}
{{- end }}

{{/* Fail early on values the schema cannot express. */}}
{{- define "tandem.validate" -}}
{{- $n := int .Values.pipeline.numStages }}
{{- $b := .Values.pipeline.stageBoundaries }}
{{- if eq (toString $b) "auto" }}
{{- if not .Values.pipeline.stageProfile }}
{{- fail "pipeline.stageBoundaries=auto needs pipeline.stageProfile: run `python -m tandem.tools.profile_stage --model DIR --device cuda --out profile.json` on a node like the stages' and pass --set-file pipeline.stageProfile=profile.json (or set the boundaries it prints with --stages N)" }}
{{- end }}
{{- if ne (get (.Values.pipeline.stageProfile | fromJson) "format") "tandem-stage-profile" }}
{{- fail "pipeline.stageProfile is not a stage profile (JSON with format tandem-stage-profile, from python -m tandem.tools.profile_stage)" }}
{{- end }}
{{- $b = list }}
{{- end }}
{{- if and $b (ne (len $b) (sub $n 1)) }}
{{- fail (printf "pipeline.stageBoundaries must list numStages-1 = %d layer indices, got %d" (sub $n 1) (len $b)) }}
{{- end }}
{{- $prev := 0 }}
{{- range $b }}
{{- if le (int .) $prev }}
{{- fail "pipeline.stageBoundaries must be strictly increasing layer indices > 0" }}
{{- end }}
{{- $prev = int . }}
{{- end }}
{{- $cores := include "tandem.cpuCores" .Values.stageWorker.resources }}
{{- $threads := int (dig "num_threads" 0 .Values.stageWorker.config) }}
{{- if and $cores $threads (gt $threads (int $cores)) }}
{{- fail (printf "stageWorker.config.num_threads=%d is more than the %s whole cores of stageWorker.resources (CPU limit, else request): OpenMP threads that wait for a core slow down many times over" $threads $cores) }}
{{- end }}
{{- if and .Values.cpuSampler.autoscaling.enabled (eq .Values.cpuSampler.discovery "static") }}
{{- fail "cpuSampler.autoscaling.enabled needs cpuSampler.discovery=endpointslices (static membership cannot follow scaling)" }}
{{- end }}
{{- range $role := list "coordinator" "stageWorker" "kvStore" "gateway" }}
{{- if (index $.Values $role).autoscaling.enabled }}
{{- fail (printf "%s.autoscaling.enabled: only cpuSampler can autoscale" $role) }}
{{- end }}
{{- end }}
{{- /* the switches are the one way to set the fields they map to, so that every service agrees */}}
{{- $byRole := dict "coordinator" (include "tandem.coordinatorOptions" .) "stageWorker" (include "tandem.stageOptions" (dict "root" . "isLast" true)) "cpuSampler" (include "tandem.samplerOptions" .) }}
{{- range $role, $options := $byRole }}
{{- range $field := keys ($options | fromJson) | sortAlpha }}
{{- if hasKey (index $.Values $role).config $field }}
{{- fail (printf "%s.config.%s is set from the technique switches: set techniques.preset and techniques.<switch> instead (helm/tandem/values.yaml lists them)" $role $field) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and .Values.model.pvc.enabled .Values.model.download.enabled }}
{{- fail "model: enable exactly one of model.pvc and model.download" }}
{{- end }}
{{- if not (or .Values.model.pvc.enabled .Values.model.download.enabled) }}
{{- fail "model: enable one of model.pvc and model.download" }}
{{- end }}
{{- end }}

{{/* Whole cores of a resources block: its CPU limit, else its request, at least 1 ("1500m" and
"1.5" give 1); "" when it sets neither. */}}
{{- define "tandem.cpuCores" -}}
{{- $cpu := dig "limits" "cpu" "" . | default (dig "requests" "cpu" "" .) }}
{{- if $cpu }}
{{- $q := toString $cpu }}
{{- if hasSuffix "m" $q }}{{ max 1 (div (atoi (trimSuffix "m" $q)) 1000) }}{{ else }}{{ max 1 (int (floor (float64 $q))) }}{{ end }}
{{- end }}
{{- end }}

{{/* Path of the model directory inside the pods. */}}
{{- define "tandem.model.dir" -}}
{{- if .Values.model.pvc.enabled -}}
{{ trimSuffix "/" .Values.model.mountPath }}/{{ .Values.model.pvc.subPath }}
{{- else -}}
{{ trimSuffix "/" .Values.model.mountPath }}/model
{{- end -}}
{{- end }}

{{/*
A pod template for one role. dict:
  root: $, component: k8s spelling, values: the role's values block, grpcService: readiness
  service name, httpPort: for an HTTP service instead (TCP liveness, readiness from GET /health),
  configMap: name, needsModel: bool, modelPatterns: the model files a download fetches (default: by
  role), labels: selector labels (rendered),
  serviceAccount: name or "", gpu: bool, configFiles: more keys of the ConfigMap, each mounted
  as /etc/tandem/KEY, metrics: bool (serves Prometheus metrics on metricsPort: scrape annotations)
*/}}
{{- define "tandem.podTemplate" -}}
{{- $root := .root }}
{{- $v := .values }}
metadata:
  labels:
    {{- include "tandem.metaLabels" $root | nindent 4 }}
    {{- .labels | nindent 4 }}
  annotations:
    checksum/config: {{ .configChecksum }}
    {{- if .metrics }}
    prometheus.io/scrape: "true"
    prometheus.io/port: {{ $root.Values.metricsPort | quote }}
    prometheus.io/path: /metrics
    {{- end }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  {{- if .serviceAccount }}
  serviceAccountName: {{ .serviceAccount }}
  {{- end }}
  {{- /* Only a pod that reads the Kubernetes API gets a token. */}}
  automountServiceAccountToken: {{ if .apiAccess }}true{{ else }}false{{ end }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- if and .needsModel $root.Values.model.download.enabled }}
  initContainers:
    - name: model-download
      image: {{ printf "%s:%s" $root.Values.model.download.image.repository $root.Values.model.download.image.tag | quote }}
      imagePullPolicy: {{ $root.Values.model.download.image.pullPolicy }}
      command: ["sh", "-c"]
      args:
        - {{ $root.Values.model.download.script | quote }}
      env:
        - name: MODEL_ID
          value: {{ $root.Values.model.download.modelId | quote }}
        - name: MODEL_REVISION
          value: {{ $root.Values.model.download.revision | quote }}
        - name: MODEL_DIR
          value: {{ include "tandem.model.dir" $root | quote }}
        - name: MODEL_PATTERNS
          value: {{ if .modelPatterns }}{{ .modelPatterns | quote }}{{ else if .httpPort }}"*.json *.jinja"{{ else }}"*.json *.safetensors"{{ end }}
        - name: HOME
          value: /tmp
        {{- with $root.Values.model.download.tokenSecret.name }}
        - name: HF_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ . }}
              key: {{ $root.Values.model.download.tokenSecret.key }}
        {{- end }}
      resources:
        {{- toYaml $root.Values.model.download.resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: model
          mountPath: {{ $root.Values.model.mountPath }}
        - name: tmp
          mountPath: /tmp
  {{- end }}
  containers:
    - name: {{ .component }}
      image: {{ printf "%s:%s" $v.image.repository (default $root.Chart.AppVersion $v.image.tag) | quote }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args:
        - {{ .component }}
        - --config
        - /etc/tandem/config.yaml
        {{- /* on SIGTERM the coordinator finishes what it holds: the grace period less the
               preStop pause and a margin to stop */}}
        - --drain-s
        - {{ max 1 (sub $v.terminationGracePeriodSeconds 10) | quote }}
        {{- range $v.extraArgs }}
        - {{ . | quote }}
        {{- end }}
      {{- if has .component (list "coordinator" "gateway") }}
      lifecycle:
        preStop:
          # a pause while the pod leaves the Service's endpoints, before SIGTERM starts the drain
          sleep:
            seconds: 5
      {{- end }}
      ports:
        {{- if .httpPort }}
        - name: http
          containerPort: {{ .httpPort }}
          protocol: TCP
        {{- else }}
        - name: grpc
          containerPort: {{ $root.Values.port }}
          protocol: TCP
        {{- if $root.Values.tls.enabled }}
        - name: health
          containerPort: {{ $root.Values.tls.healthPort }}
          protocol: TCP
        {{- end }}
        {{- end }}
        {{- if .metrics }}
        - name: metrics
          containerPort: {{ $root.Values.metricsPort }}
          protocol: TCP
        {{- end }}
      env:
        - name: POD_NAME
          valueFrom:
            fieldRef:
              fieldPath: metadata.name
        - name: POD_NAMESPACE
          valueFrom:
            fieldRef:
              fieldPath: metadata.namespace
        {{- if and (has .component (list "coordinator" "gateway")) $root.Values.apiKey.enabled }}
        - name: TANDEM_API_KEY
          valueFrom:
            secretKeyRef:
              name: {{ $root.Values.apiKey.secretName }}
              key: {{ $root.Values.apiKey.key }}
        {{- end }}
        {{- if and (eq .component "coordinator") $root.Values.apiKey.enabled $root.Values.apiKey.adminKey }}
        - name: TANDEM_ADMIN_KEY
          valueFrom:
            secretKeyRef:
              name: {{ $root.Values.apiKey.secretName }}
              key: {{ $root.Values.apiKey.adminKey }}
        {{- end }}
        {{- with $v.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if .httpPort }}
      startupProbe:
        tcpSocket:
          port: http
        {{- toYaml $v.probes.startup | nindent 8 }}
      livenessProbe:
        tcpSocket:
          port: http
        {{- toYaml $v.probes.liveness | nindent 8 }}
      readinessProbe:
        httpGet:
          path: /health
          port: http
        {{- toYaml $v.probes.readiness | nindent 8 }}
      {{- else }}
      {{- /* with TLS the main port wants a client certificate, which kubelet has not */}}
      {{- $probePort := ternary $root.Values.tls.healthPort $root.Values.port $root.Values.tls.enabled }}
      startupProbe:
        grpc:
          port: {{ $probePort }}
        {{- toYaml $v.probes.startup | nindent 8 }}
      livenessProbe:
        grpc:
          port: {{ $probePort }}
        {{- toYaml $v.probes.liveness | nindent 8 }}
      readinessProbe:
        grpc:
          port: {{ $probePort }}
          service: {{ .grpcService }}
        {{- toYaml $v.probes.readiness | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml $v.resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/tandem/config.yaml
          subPath: config.yaml
          readOnly: true
        {{- range .configFiles }}
        - name: config
          mountPath: /etc/tandem/{{ . }}
          subPath: {{ . }}
          readOnly: true
        {{- end }}
        - name: tmp
          mountPath: /tmp
        {{- if .needsModel }}
        - name: model
          mountPath: {{ $root.Values.model.mountPath }}
          readOnly: {{ $root.Values.model.pvc.enabled }}
        {{- end }}
        {{- if $root.Values.tls.enabled }}
        - name: tls
          mountPath: /etc/tandem/tls
          readOnly: true
        {{- end }}
  volumes:
    - name: config
      configMap:
        name: {{ .configMap }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ $root.Values.tmpSizeLimit }}
    {{- if .needsModel }}
    - name: model
      {{- if $root.Values.model.pvc.enabled }}
      persistentVolumeClaim:
        claimName: {{ $root.Values.model.pvc.claimName }}
        readOnly: true
      {{- else }}
      emptyDir:
        sizeLimit: {{ $root.Values.model.download.sizeLimit }}
      {{- end }}
    {{- end }}
    {{- if $root.Values.tls.enabled }}
    - name: tls
      secret:
        secretName: {{ $root.Values.tls.secretName }}
        defaultMode: 0440
    {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
{{- end }}
