"""Few-shot algorithms. Each module holds one Algorithm, named by its config file in conf/algo/:

maml.MAML (also first-order), maml_l2l.MAMLL2L (learn2learn reference), matching.MatchingNetworks,
protonet.ProtoNet, siamese.Siamese, mann.MANN (also the LSTM baseline), meta_lstm.MetaLSTM, reptile.Reptile,
meta_sgd.MetaSGD, maml_pp.MAMLPlusPlus, anil.ANIL, pretrain (the sinusoid baseline). Nothing is imported here,
so `import fewshot.algorithms.maml` does not import learn2learn.
"""
