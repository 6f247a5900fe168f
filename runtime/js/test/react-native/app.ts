// Type-checked (not run) against onnxruntime-react-native's types: what a React Native app writes.
import * as ort from "onnxruntime-react-native";
import {evaluate, Trainer, webCrypto, type Dataset} from "../../src/index.js";
import {openNativeBundle, type NativeFileSystem, type SecureStore} from "../../src/react-native/index.js";

declare const RNFS: NativeFileSystem & {DocumentDirectoryPath: string};
declare const secureStore: SecureStore;
declare const quickCrypto: Crypto;
declare const photos: Dataset;

export async function personalize(): Promise<number | null> {
  const bundle = await openNativeBundle(`${RNFS.DocumentDirectoryPath}/bundle`,
    {fs: RNFS, secureStore, crypto: webCrypto(quickCrypto)});
  const trainer = new Trainer(ort, bundle, {epochs: 3, engine: {executionProviders: ["cpu"]}});
  await trainer.fit(photos);
  return (await evaluate(ort, bundle, photos)).accuracy;
}
