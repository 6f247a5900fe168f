/**
 * edgeadapt's runtime for JavaScript apps: train, evaluate and predict with an edgeadapt bundle on the onnxruntime
 * package the app already ships (onnxruntime-web, -node or -react-native), reading and writing the same bundle,
 * state file and training log as the Python runtime. The platform (storage, crypto, device key) is injected; see
 * `@edgeadapt/runtime/node` for Node's.
 */

export {Bundle, SIGNATURE_NAME, TRAIN_LOG, type GraphFiles, type OpenOptions} from "./bundle.js";
export {clipFeatures, decodeWav, logMel, resample, wavFeatures} from "./audio.js";
export {audioDataset, batchInputs, csvDataset, encodeLabels, imageDataset, inflateRaw, npzDataset, readNpz, readTable,
  size, split, subset, textDataset, type Dataset} from "./data.js";
export {PortableEngine, type EngineOptions, type ModelInput, type Ort} from "./engine.js";
export {BackendError, BundleError, CancelledError, ConfigError, DataError, EdgeAdaptError,
  TrainingError} from "./errors.js";
export {SealedFeatures, type FeatureEntry, type FeatureStore} from "./feature_cache.js";
export {graphInterface} from "./graph.js";
export {prepareImage, resizeBilinear, type Pixels} from "./image.js";
export {evaluate, evaluationEngine, predict, type Prediction} from "./inference.js";
export {parseManifest, type Manifest} from "./manifest.js";
export {learningRate, type Metrics} from "./metrics.js";
export {webCrypto, type BundleStorage, type CryptoProvider, type DeviceKeyStore} from "./platform.js";
export {permutation} from "./rng.js";
export {decodeState, encodeState, type Progress, type TrainState} from "./state.js";
export {normalize, preTokenize, WordPiece} from "./text.js";
export {Trainer, type EpochRecord, type TrainConfig, type TrainSummary} from "./trainer.js";
